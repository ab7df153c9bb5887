"""DeepSpeed glue: engine set-up (ZeRO 0-3, parameter groups, persistence) and checkpoints."""
