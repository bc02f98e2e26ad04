"""Benchmarks that print a table and write JSON: decision, telemetry, scheduler."""
