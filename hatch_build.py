"""Build hook: compile the decision kernel (netkv/routing/_kernel.c) when a C compiler is there.

The kernel is optional: without a compiler (or with ``NETKV_NO_EXTENSIONS=1``) the install
goes on, says so, and :mod:`netkv.routing.fused` keeps its numpy path (the same decisions,
bit for bit, at about twice the cost per decision at |D| = 64). The module is built next to
its source, so an editable install imports it from the tree; a wheel gets it as a
platform-specific file. Only the standard library and hatchling are used here: the hook runs
in pip's isolated build environment.
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

SOURCE = Path("netkv/routing/_kernel.c")
# -ffp-contract=off: no fused multiply-add, so every product and sum rounds as numpy's do.
FLAGS = ["-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-std=c11",
         "-Wall", "-Wextra", "-Wno-unused-parameter"]


def _compiler() -> list[str] | None:
    named = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(named)
    return cmd if cmd and shutil.which(cmd[0]) else None


def build_kernel(root: Path) -> Path | None:
    """Compile the kernel into the source tree; the built file, or None (reason printed)."""
    if os.environ.get("NETKV_NO_EXTENSIONS"):
        print("netkv: NETKV_NO_EXTENSIONS is set: the decision kernel is not built",
              file=sys.stderr)
        return None
    cc = _compiler()
    if cc is None or sys.platform == "win32":
        print("netkv: no C compiler found: the decision kernel is not built (the numpy "
              "path decides the same, more slowly)", file=sys.stderr)
        return None
    target = root / SOURCE.with_name("_kernel" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    link = ["-bundle", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" \
        else ["-shared"]
    cmd = [*cc, *FLAGS, *link, f"-I{sysconfig.get_paths()['include']}", str(root / SOURCE),
           "-o", str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"netkv: the decision kernel did not build ({exc}): the numpy path is used",
              file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"netkv: the decision kernel did not build: {done.stderr.strip()[-2000:]}\n"
              "netkv: the numpy path is used", file=sys.stderr)
        target.unlink(missing_ok=True)
        return None
    return target


class KernelBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        built = build_kernel(root)
        if built is None:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports it from the tree
            build_data["force_include"][str(built)] = str(built.relative_to(root))
