"""Scheduler service: picks decode instances over the live congestion map."""
