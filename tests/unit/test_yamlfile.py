"""The one reader of user-named YAML files: each failure is an InputError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from netkv.errors import InputError
from netkv.yamlfile import read_yaml

pytestmark = pytest.mark.unit


def test_reads_a_mapping_and_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("proxy:\n  port: 8\n")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "a.yaml", "config file") == {"proxy": {"port": 8}}
    assert read_yaml(tmp_path / "empty.yaml", "config file") is None


def test_a_missing_file_names_the_file_and_the_kind(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        read_yaml(tmp_path / "nope.yaml", "scenario")
    assert err.value.where == str(tmp_path / "nope.yaml")
    assert err.value.message.startswith("cannot read scenario:")


def test_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [2\nc: 3\n")
    with pytest.raises(InputError) as err:
        read_yaml(path, "topology file")
    assert err.value.where.startswith(f"{path}:")
    assert err.value.where.rsplit(":", 1)[1].isdigit()
    assert "not valid YAML/JSON" in err.value.message


def test_binary_junk_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError) as err:
        read_yaml(path, "schedule")
    assert err.value.where == str(path)
