"""compact-train: the training loop, its typed run config, data and the progress line."""
