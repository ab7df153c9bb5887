"""Tools around training, built on compact_dist.training (never imported by it): compact-memory,
compact-plan, compact-export (and its HF -> Megatron inverse) and compact-preprocess."""
