"""Scenarios: the simulated cluster and the numbers behind its models, from a YAML file.

``--scenario NAME`` finds ``netkv/sim/scenarios/NAME.yaml``; a path works too. Every field is
parsed strictly (unknown fields, wrong types and impossible values are errors naming the
file and field). The YAML files cite where each number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from netkv.core.kvsize import ModelSpec, model_spec
from netkv.core.topology import Topology
from netkv.core.topology_file import parse_topology
from netkv.errors import InputError
from netkv.fields import bound, from_mapping
from netkv.yamlfile import read_yaml

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


LINK_KINDS = {"leaf_up", "leaf_down", "pod_up", "pod_down", "nic_up", "nic_down"}


def _check_kinds(where: str, kinds: tuple[str, ...]) -> None:
    for i, kind in enumerate(kinds):
        if kind not in LINK_KINDS:
            raise InputError(f"{where}[{i}]", f"unknown link kind {kind!r}; known: "
                             f"{', '.join(sorted(LINK_KINDS))}")


@dataclass(frozen=True, slots=True)
class TenantSection:
    """Other tenants' elephant flows: each eligible link alternates OFF/ON with lognormal
    dwell times; while ON it carries ``flows_min..flows_max`` elastic elephants, each capped
    at ``flow_gbps`` (the sender's NIC) and hashed onto one ECMP member."""

    hot_fraction: float = field(default=0.125, metadata=bound(ge=0, le=0.9))
    dwell_median_s: float = field(default=30.0, metadata=bound(gt=0))
    dwell_sigma: float = field(default=1.0, metadata=bound(ge=0, le=3))
    flows_min: int = field(default=1, metadata=bound(ge=1))
    flows_max: int = field(default=4, metadata=bound(ge=1))
    flow_gbps: float = field(default=400.0, metadata=bound(gt=0))
    links: tuple[str, ...] = ("leaf_up", "pod_up", "pod_down")

    def __post_init__(self) -> None:
        if self.flows_min > self.flows_max:
            raise InputError("background.tenants.flows_min", "must be <= flows_max")
        _check_kinds("background.tenants.links", self.links)


@dataclass(frozen=True, slots=True)
class WeightLoadSection:
    """Model weights loaded from storage behind the core when instances (re)start."""

    per_hour: float = field(default=0.0, metadata=bound(ge=0))  # cluster-wide


@dataclass(frozen=True, slots=True)
class BackgroundSection:
    """Traffic that is not this scheduler's KV. ``model: elastic`` (default): named sources
    made of flows that share links max-min fairly with KV flows. ``model: inelastic`` (a
    sensitivity knob only): the legacy hot spots (``mean_hotspots`` .. ``links``) that take a
    fixed share of a link and never yield."""

    model: Literal["elastic", "inelastic"] = "elastic"
    tenants: TenantSection = TenantSection()
    prefix_fetch: bool = True
    weight_loads: WeightLoadSection = WeightLoadSection()
    mean_hotspots: float = field(default=1.0, metadata=bound(ge=0))
    mean_duration_s: float = field(default=30.0, metadata=bound(gt=0))
    min_load: float = field(default=0.3, metadata=bound(ge=0, lt=1))
    max_load: float = field(default=0.9, metadata=bound(ge=0, lt=1))
    links: tuple[str, ...] = ("leaf_up", "pod_up", "pod_down")

    def __post_init__(self) -> None:
        if self.min_load > self.max_load:
            raise InputError("background.min_load", "must be <= background.max_load")
        _check_kinds("background.links", self.links)


@dataclass(frozen=True, slots=True)
class NetworkSection:
    """How the fabric is built under the topology's links and how KV moves over it.

    ``nics_per_host``: physical NICs in each host's NIC bundle (instances are bound to the
    NICs of their GPUs); ``spines_per_pod``: ECMP members of each leaf bundle;
    ``timing``: ``pull`` (decoder chosen when prefill ends, then pulls) or ``layerwise``
    (pair chosen at arrival, KV streamed layer by layer during prefill);
    ``handover_s``: fixed cost per transfer (handshake, descriptor posting) before bytes
    flow."""

    nics_per_host: int = field(default=1, metadata=bound(ge=1, le=64))
    spines_per_pod: int = field(default=1, metadata=bound(ge=1, le=64))
    timing: Literal["pull", "layerwise"] = "pull"
    handover_s: float = field(default=0.0, metadata=bound(ge=0))


@dataclass(frozen=True, slots=True)
class FaultEntry:
    """A fault a static label cannot see. ``degraded_nic``: NIC ``nic`` of ``host`` at
    ``factor`` of its rate (a lower negotiated speed); ``failed_rail``: NIC ``nic`` of every
    host down (transfers re-stripe over the others); ``flap``: member ``member`` of topology
    link ``link`` down (``factor``) for half of every ``period_s``; ``nic_skew``: every
    transfer of ``host`` on its first NIC (a singleton transfer engine)."""

    kind: Literal["degraded_nic", "failed_rail", "flap", "nic_skew"]
    host: str = ""
    nic: int = field(default=0, metadata=bound(ge=0))
    link: str = ""
    member: int = field(default=0, metadata=bound(ge=0))
    factor: float = field(default=0.25, metadata=bound(ge=0, le=1))
    start_s: float = field(default=0.0, metadata=bound(ge=0))
    end_s: float = field(default=1e9, metadata=bound(gt=0))
    period_s: float = field(default=20.0, metadata=bound(gt=0))


@dataclass(frozen=True, slots=True)
class TelemetrySection:
    interval_s: float = field(default=1.0, metadata=bound(gt=0))
    delay_s: float = field(default=0.5, metadata=bound(ge=0))
    noise: float = field(default=0.1, metadata=bound(ge=0))
    floor: float = field(default=0.02, metadata=bound(gt=0, le=1))
    idle_noise: float = field(default=0.0, metadata=bound(ge=0, le=1))
    own_flows: bool = False


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
    network: NetworkSection = NetworkSection()
    faults: tuple[FaultEntry, ...] = ()
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
    data = read_yaml(path, "scenario")
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
