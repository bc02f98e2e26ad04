"""Topology files on disk (YAML or JSON): read, decode, then validate with the core's
:func:`~netkv.core.topology_file.parse_topology`. The core itself does no file I/O."""

from __future__ import annotations

from pathlib import Path

from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.yamlfile import read_yaml


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; every error names the file and the field."""
    path = Path(path)
    return parse_topology(read_yaml(path, "topology file"), str(path))
