"""DeepSpeed glue: engine set-up (ZeRO 0-3, parameter groups, persistence), the subspace
factors outside the ZeRO-3 fetch (zero3_factor), and checkpoints."""
