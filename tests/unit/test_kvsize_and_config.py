"""KV sizing presets, strict field conversion and settings loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

from netkv.config import (
    MqttSettings,
    RedisSettings,
    Section,
    ServiceSettings,
    load_settings,
    reveal,
)
from netkv.core.kvsize import PRESETS, ModelSpec, model_spec
from netkv.errors import InputError
from netkv.fields import bound, from_mapping

pytestmark = pytest.mark.unit


def test_llama3_70b_is_320_kib_per_token() -> None:
    assert model_spec("llama3-70b").bytes_per_token == 327_680
    assert model_spec("llama3-8b").bytes_per_token == 131_072
    assert model_spec("llama3-70b").kv_bytes(12_000) == 12_000 * 327_680
    assert all(spec.source for spec in PRESETS.values())


def test_unknown_model_and_bad_shapes_are_input_errors() -> None:
    with pytest.raises(InputError, match="llama3-70b"):
        model_spec("gpt-9")
    with pytest.raises(InputError, match="layers"):
        ModelSpec("x", layers=0, kv_heads=8, head_dim=128)


@dataclass(frozen=True)
class _Inner:
    rate: float = field(default=1.0, metadata=bound(gt=0))


@dataclass(frozen=True)
class _Outer:
    name: str
    inner: _Inner = _Inner()
    ports: tuple[int, ...] = ()
    debug: bool = False


def test_from_mapping_is_strict() -> None:
    assert from_mapping(_Outer, {"name": "a"}) == _Outer("a")
    with pytest.raises(InputError, match="name: missing"):
        from_mapping(_Outer, {})
    with pytest.raises(InputError, match="inner.rate: must be > 0"):
        from_mapping(_Outer, {"name": "a", "inner": {"rate": 0}})
    with pytest.raises(InputError, match="finite"):
        from_mapping(_Outer, {"name": "a", "inner": {"rate": float("nan")}})
    with pytest.raises(InputError, match=r"ports\[1\]"):
        from_mapping(_Outer, {"name": "a", "ports": [1, "x"]})
    with pytest.raises(InputError, match="debug: expected a boolean"):
        from_mapping(_Outer, {"name": "a", "debug": 1})


class _InnerSection(Section):
    rate: float = Field(default=1.0, gt=0)


class _EnvService(ServiceSettings):
    SECTION: ClassVar[str] = "scheduler"
    name: str = "a"
    inner: _InnerSection = _InnerSection()
    ports: tuple[int, ...] = ()
    debug: bool = False


def test_env_overrides_are_parsed_and_checked() -> None:
    env = {"NETKV_NAME": "b", "NETKV_INNER__RATE": "2.5", "NETKV_PORTS": "1, 2",
           "NETKV_DEBUG": "yes"}
    s = load_settings(_EnvService, "scheduler", None, env)
    assert (s.name, s.inner.rate, s.ports, s.debug) == ("b", 2.5, (1, 2), True)
    with pytest.raises(InputError, match="NETKV_INNER__RATE"):
        load_settings(_EnvService, "scheduler", None, {"NETKV_INNER__RATE": "-1"})


class _Service(ServiceSettings):
    SECTION: ClassVar[str] = "scheduler"
    redis: RedisSettings = RedisSettings()
    mqtt: MqttSettings = MqttSettings()
    listen: str = "127.0.0.1"


def test_load_settings_merges_shared_sections(tmp_path: Path) -> None:
    cfg = tmp_path / "netkv.yaml"
    cfg.write_text("redis: {url: 'redis://10.0.0.1:6380/0', password: s3cret}\n"
                   "scheduler: {listen: 0.0.0.0}\n")
    s = load_settings(_Service, "scheduler", cfg, {"NETKV_MQTT__PORT": "1884"})
    assert s.redis.url == "redis://10.0.0.1:6380/0" and reveal(s.redis.password) == "s3cret"
    assert s.mqtt.port == 1884 and s.listen == "0.0.0.0"
    s = load_settings(_Service, "scheduler", cfg, {"NETKV_LISTEN": "::1"},
                      overrides={"listen": "127.0.0.2"})
    assert s.listen == "127.0.0.2"
    cfg.write_text("redis: {url: 'http://x'}\n")
    with pytest.raises(InputError, match="redis.url"):
        load_settings(_Service, "scheduler", cfg, {})
    cfg.write_text("scheduler: {lisen: x}\n")
    with pytest.raises(InputError, match=r"netkv\.yaml: scheduler\.lisen"):
        load_settings(_Service, "scheduler", cfg, {})
