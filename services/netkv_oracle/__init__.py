"""Oracle service: turns agent samples into the congestion map and serves costs."""
