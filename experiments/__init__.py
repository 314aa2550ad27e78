"""specjax experiments: the absl launcher, workloads, and measured results."""
