"""train_configs package."""
