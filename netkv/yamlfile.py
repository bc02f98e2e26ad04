"""Reading a YAML (or JSON) file a user named: one reader, one shape of error.

Config files, scenarios, topology files and the testbed's schedules are all read here; a file
that cannot be read or parsed is an :class:`~netkv.errors.InputError` naming the file (and,
for a syntax error, its line). What the data must hold is checked by each caller's own typed
definition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from netkv.errors import InputError


def read_yaml(path: str | Path, what: str) -> Any:
    """The data in the file at ``path`` (None for an empty file); ``what`` names the kind of
    file in the error ("config file", "scenario", ...)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(str(path), f"cannot read {what}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}", f"not valid YAML/JSON: {exc}") from None
