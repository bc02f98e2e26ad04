"""Workloads: request traces in the Mooncake format, read strictly (and, later, synthesised)."""
