"""The process: the `promptswap` command line, `serve` and its start, the model command, and logging."""
