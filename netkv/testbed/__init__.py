"""Testbeds that move real bytes: an emulated fat-tree in network namespaces (``netkv
testbed``) and the compose stack (``docker-compose.yml``, ``compose/``)."""
