"""The routing hot path's optional C modules (``netkv/routing/_*.c``), loaded in one place.

Each is built at install time where a C compiler is present (``hatch_build.py``) and does
exactly what the Python code beside it does, only faster: :mod:`netkv.routing._kernel` (the
fused ``netkv`` decision's arithmetic, used by :mod:`netkv.routing.fused`) and
:mod:`netkv.routing._prefixes` (the prefix index's per-request loops, used by
:mod:`netkv.routing.prefixes`). A module that is missing, or was built from other sources
than the Python that calls it (its ``ABI`` number differs: reinstall to rebuild), is not
used; the Python path then decides the same, more slowly.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load(name: str, abi: int) -> ModuleType | None:
    """``netkv.routing.<name>`` if it is built with ``ABI == abi``, else None."""
    try:
        module = importlib.import_module(f"netkv.routing.{name}")
    except ImportError:
        return None
    return module if getattr(module, "ABI", None) == abi else None
