"""Scenarios: the simulated cluster and the numbers behind its models, from a YAML file.

``--scenario NAME`` finds ``netkv/sim/scenarios/NAME.yaml``; a path works too. Every field is
parsed strictly (unknown fields, wrong types and impossible values are errors naming the
file and field). The YAML files cite where each number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from netkv.core.kvsize import ModelSpec, model_spec
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.fields import bound, from_mapping

SCENARIO_DIR = Path(__file__).with_name("scenarios")
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class ModelSection:
    preset: str = "llama3-70b"
    params_billion: float = field(default=70.6, metadata=bound(gt=0))
    hidden: int = field(default=8192, metadata=bound(ge=1))


@dataclass(frozen=True, slots=True)
class GpuSection:
    memory_gib: float = field(default=80.0, metadata=bound(gt=0))
    peak_tflops: float = field(default=989.0, metadata=bound(gt=0))
    hbm_tb_s: float = field(default=3.35, metadata=bound(gt=0))


@dataclass(frozen=True, slots=True)
class PrefillSection:
    mfu: float = field(default=0.45, metadata=bound(gt=0, le=1))
    overhead_s: float = field(default=0.02, metadata=bound(ge=0))
    cache_memory_fraction: float = field(default=0.9, metadata=bound(ge=0, le=1))


@dataclass(frozen=True, slots=True)
class DecodeSection:
    mbu: float = field(default=0.6, metadata=bound(gt=0, le=1))
    step_overhead_s: float = field(default=0.003, metadata=bound(ge=0))
    kv_memory_fraction: float = field(default=0.9, metadata=bound(gt=0, le=1))
    prefix_cache_fraction: float = field(default=0.25, metadata=bound(ge=0, le=1))


@dataclass(frozen=True, slots=True)
class BackgroundSection:
    mean_hotspots: float = field(default=1.0, metadata=bound(ge=0))
    mean_duration_s: float = field(default=30.0, metadata=bound(gt=0))
    min_load: float = field(default=0.3, metadata=bound(ge=0, lt=1))
    max_load: float = field(default=0.9, metadata=bound(ge=0, lt=1))
    links: tuple[str, ...] = ("leaf_up", "pod_up", "pod_down")

    def __post_init__(self) -> None:
        if self.min_load > self.max_load:
            raise InputError("background.min_load", "must be <= background.max_load")
        known = {"leaf_up", "leaf_down", "pod_up", "pod_down", "nic_up", "nic_down"}
        for i, kind in enumerate(self.links):
            if kind not in known:
                raise InputError(f"background.links[{i}]",
                                 f"unknown link kind {kind!r}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True, slots=True)
class TelemetrySection:
    interval_s: float = field(default=1.0, metadata=bound(gt=0))
    delay_s: float = field(default=0.5, metadata=bound(ge=0))
    noise: float = field(default=0.1, metadata=bound(ge=0))
    floor: float = field(default=0.02, metadata=bound(gt=0, le=1))


@dataclass(frozen=True, slots=True)
class SloSection:
    ttft_scale: float = field(default=2.0, metadata=bound(gt=0))
    ttft_floor_s: float = field(default=0.5, metadata=bound(ge=0))
    tbt_s: float = field(default=0.1, metadata=bound(gt=0))


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    name: str
    topology: dict[str, Any]
    description: str = ""
    model: ModelSection = ModelSection()
    gpu: GpuSection = GpuSection()
    prefill: PrefillSection = PrefillSection()
    decode: DecodeSection = DecodeSection()
    background: BackgroundSection = BackgroundSection()
    telemetry: TelemetrySection = TelemetrySection()
    slo: SloSection = SloSection()
    rate_scale: float = field(default=1.0, metadata=bound(gt=0))
    length_scale: float = field(default=1.0, metadata=bound(gt=0))
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 1


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario with its topology built and its derived figures."""

    spec: ScenarioSpec
    source: str

    @cached_property
    def topology(self) -> Topology:
        try:
            return parse_topology(self.spec.topology, f"{self.source}: topology")
        except InputError:
            raise

    @cached_property
    def model(self) -> ModelSpec:
        try:
            return model_spec(self.spec.model.preset)
        except InputError as exc:
            raise InputError(f"{self.source}: model.preset", exc.message) from None

    @property
    def weights_bytes(self) -> float:
        return self.spec.model.params_billion * 1e9 * self.model.dtype_bytes

    def free_memory_bytes(self, gpus: int) -> float:
        """Memory an instance of ``gpus`` GPUs has left for KV after the weights."""
        free = gpus * self.spec.gpu.memory_gib * GIB - self.weights_bytes
        if free <= 0:
            raise InputError(f"{self.source}: gpu.memory_gib",
                             f"{gpus} GPUs cannot hold the model weights")
        return free


def _read(name_or_path: str, depth: int = 0) -> tuple[Path, Any]:
    """A scenario file's data, with its ``base:`` scenario (if any) merged underneath."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
            raise InputError("scenario", f"unknown scenario {name_or_path!r}; known: {known}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(str(path), f"cannot read scenario: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML: {exc}") from None
    if isinstance(data, dict) and "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or depth > 4:
            raise InputError(f"{path}: base", "must name another scenario (no deep chains)")
        _, base_data = _read(base, depth + 1)
        if isinstance(base_data, dict):
            base_data.pop("name", None)
            base_data.pop("description", None)
            data = _merge(base_data, data)
    return path, data


def load_scenario(name_or_path: str, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario by name (``fat-tree-64``) or path, validating every field. A file may
    start from another with ``base: NAME`` and override only what differs."""
    path, data = _read(name_or_path)
    if isinstance(data, dict) and overrides:
        data = _merge(data, overrides)
    try:
        spec = from_mapping(ScenarioSpec, data)
    except InputError as exc:
        raise InputError(f"{path}: {exc.where}", exc.message) from None
    scenario = Scenario(spec, str(path))
    scenario.topology  # noqa: B018  (validate now, not mid-run)
    scenario.model  # noqa: B018
    if not scenario.topology.instances_with_role("decode") or \
            not scenario.topology.instances_with_role("prefill"):
        raise InputError(f"{path}: topology", "needs prefill and decode instances")
    return scenario


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
