"""Request-level serving: the configuration, workload, loop, metrics and comparisons."""
