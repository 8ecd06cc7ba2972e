"""The `strata` CLI, the training loop, config loading and run reporting."""
