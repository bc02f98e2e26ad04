"""`netkv bench select` measures both paths in child processes and reports them (table and
JSON); without valgrind it says so and still gives the wall times."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from netkv.bench import select_cost
from netkv.routing.fused import KERNEL_BUILT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    select_cost.configure(parser)
    args = parser.parse_args(["--decoders", "16", "--warmup", "300", "--selects", "100",
                              "--out", str(tmp_path / "select.json"), *extra])
    args.environ = dict(os.environ)
    return args


def test_both_paths_are_timed_without_valgrind(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert select_cost.run(_args(tmp_path)) == 0
    result = json.loads((tmp_path / "select.json").read_text())
    expected = {"native", "python"} if KERNEL_BUILT else {"python"}
    assert set(result["variants"]) == expected
    for entry in result["variants"].values():
        assert entry["wall_us"] > 0 and "instructions" not in entry
    assert "valgrind not installed" in capsys.readouterr().out


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert select_cost.run(_args(tmp_path, "--selects", "0")) == 2
    assert not (tmp_path / "select.json").exists()
