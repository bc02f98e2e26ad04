"""Telemetry contracts shared by agents and the oracle: sample types, wire format, names."""
