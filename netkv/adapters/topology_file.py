"""Topology files on disk (YAML or JSON): read, decode, then validate with the core's
:func:`~netkv.core.topology_file.parse_topology`. The core itself does no file I/O."""

from __future__ import annotations

from pathlib import Path

import yaml

from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; every error names the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(str(path), f"cannot read topology file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}", f"not valid YAML/JSON: {exc}") from None
    return parse_topology(data, str(path))
