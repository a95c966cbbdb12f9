"""The harness: configuration, distributed set-up, data, the timed training loop, metrics and results."""
