"""Adapters at the edge: Redis and MQTT clients built from typed settings."""
