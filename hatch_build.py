"""Build hook: compile the routing hot path's C modules (netkv/routing/_*.c) when a C compiler
is there.

They are optional (:mod:`netkv.routing.native`): without a compiler (or with
``NETKV_NO_EXTENSIONS=1``) the install goes on, says so, and the Python code beside them
decides the same, bit for bit, at about twice the cost per decision at |D| = 64. Each
module is built next to its source, so an editable install imports it from the tree; a wheel
gets it as a platform-specific file. Only the standard library and hatchling are used here:
the hook runs in pip's isolated build environment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCES = (Path("netkv/routing/_kernel.c"), Path("netkv/routing/_prefixes.c"))
# -ffp-contract=off: no fused multiply-add, so every product and sum rounds as numpy's do.
FLAGS = ["-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-std=c11",
         "-Wall", "-Wextra", "-Wno-unused-parameter"]


def _compiler() -> list[str] | None:
    named = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(named)
    return cmd if cmd and shutil.which(cmd[0]) else None


def build_all(root: Path) -> list[Path]:
    """Compile every module into the source tree; the files built (reasons printed)."""
    if os.environ.get("NETKV_NO_EXTENSIONS"):
        print("netkv: NETKV_NO_EXTENSIONS is set: the C modules are not built",
              file=sys.stderr)
        return []
    cc = _compiler()
    if cc is None or sys.platform == "win32":
        print("netkv: no C compiler found: the C modules are not built (the Python path "
              "decides the same, more slowly)", file=sys.stderr)
        return []
    # (a source tree without them, e.g. a dependencies-only install, builds nothing)
    return [built for source in SOURCES
            if (root / source).is_file() and (built := build(cc, root, source)) is not None]


def build(cc: list[str], root: Path, source: Path) -> Path | None:
    """Compile one module; the built file, or None (the reason printed)."""
    target = root / source.with_suffix(str(sysconfig.get_config_var("EXT_SUFFIX")))
    link = ["-bundle", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" \
        else ["-shared"]
    cmd = [*cc, *FLAGS, *link, f"-I{sysconfig.get_paths()['include']}", str(root / source),
           "-o", str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"netkv: {source} did not build ({exc}): its Python path is used",
              file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"netkv: {source} did not build: {done.stderr.strip()[-2000:]}\n"
              "netkv: its Python path is used", file=sys.stderr)
        target.unlink(missing_ok=True)
        return None
    return target


class NativeBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        built = build_all(root)
        if not built:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports them from the tree
            for path in built:
                build_data["force_include"][str(path)] = str(path.relative_to(root))
