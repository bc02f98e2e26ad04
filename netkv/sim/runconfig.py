"""What one simulated run is asked to do (:class:`RunConfig`) and what it returns
(:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from netkv.core.topology import FloatArray, IntArray
from netkv.sim.scenario import TelemetrySection

OracleKind = Literal["telemetry", "truth", "static"]


@dataclass(frozen=True)
class RunConfig:
    """One simulated run: the policy (name, params, which oracle it sees) and the knobs.

    ``oracle``: ``telemetry`` (the sampled view), ``truth`` (the exact link state) or
    ``static`` (the per-tier nominal-share table, no measurement: Dynamo DEP #9118's QoS
    table)."""

    policy: str
    params: dict[str, object] = field(default_factory=dict)
    oracle: OracleKind = "telemetry"
    label: str = ""
    congestion: float = 1.0
    telemetry_interval_s: float | None = None
    telemetry_delay_s: float | None = None
    telemetry_noise: float | None = None
    seed: int | None = None  # background, noise and hashing seed (default: the scenario's)
    dwell_scale: float = 1.0  # multiplier on the tenants' hot-spot dwell times

    def telemetry(self, base: TelemetrySection) -> TelemetrySection:
        """The scenario's telemetry with this run's overrides applied."""
        out = base
        if self.telemetry_interval_s is not None:
            out = replace(out, interval_s=self.telemetry_interval_s)
        if self.telemetry_delay_s is not None:
            out = replace(out, delay_s=self.telemetry_delay_s)
        if self.telemetry_noise is not None:
            out = replace(out, noise=self.telemetry_noise)
        return out

    @property
    def name(self) -> str:
        return self.label or (self.policy if self.oracle == "telemetry"
                              else f"{self.policy}@{self.oracle}")


@dataclass
class RunResult:
    """Per-request outcomes of one run (arrays indexed by request)."""

    name: str
    ttft_s: FloatArray
    tbt_s: FloatArray
    slo_ttft_s: FloatArray
    transfer_s: FloatArray
    queue_s: FloatArray
    prefill_s: FloatArray  # arrival to KV ready at the prefill instance (queue + compute)
    kv_bytes: FloatArray
    tier: IntArray
    completions: IntArray
    decision_s: FloatArray
    predicted_ttft_s: FloatArray
    requested_bytes: float
    delivered_bytes: float
    wall_s: float = 0.0
