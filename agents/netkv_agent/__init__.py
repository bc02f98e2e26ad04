"""Host agent: probes the network around one GPU host and publishes samples."""
