"""Run a NetKV service with a KV size per token scaled like the testbed's links.

``python -m netkv.testbed.scaled BYTES_PER_TOKEN scheduler --config FILE`` registers the model
preset ``testbed-<BYTES_PER_TOKEN>bpt`` (one layer, one head of BYTES_PER_TOKEN bytes) and then
runs ``netkv scheduler ...``. The testbed scales link rates by ``scale`` and KV bytes by the
same factor; the scheduler must predict transfer times from the bytes that really move, and
its ``model`` setting only accepts presets, hence this wrapper (testbed-only; production
configs name a real model).
"""

from __future__ import annotations

import sys

from netkv.cli import main as netkv_main
from netkv.core.kvsize import PRESETS, ModelSpec


def scaled_model(bytes_per_token: int) -> ModelSpec:
    return ModelSpec(f"testbed-{bytes_per_token}bpt", layers=1, kv_heads=1,
                     head_dim=bytes_per_token, dtype_bytes=1, kv_planes=1,
                     source="netkv testbed: a real model's KV bytes per token times the "
                     "testbed's scale")


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m netkv.testbed.scaled BYTES_PER_TOKEN COMMAND [ARGS...]",
              file=sys.stderr)
        return 2
    spec = scaled_model(int(argv[0]))
    PRESETS[spec.name] = spec
    return netkv_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
