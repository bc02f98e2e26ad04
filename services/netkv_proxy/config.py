"""Typed, frozen proxy settings, loaded once from the ``proxy`` config section, the shared
``redis``/``mqtt``/``topology`` sections, ``NETKV_PROXY__*`` variables and the flags.

Workers come from ``--prefill`` / ``--decode`` flags or the config file::

    proxy:
      mode: pull                 # pull (vLLM NixlConnector), push (vLLM WRITE), bootstrap
      prefill:
        - {url: "http://10.0.0.1:8100", host: gpu-a1, bootstrap_port: 8998}
      decode:
        - {url: "http://10.0.0.2:8200", host: gpu-a2}

A flag is ``URL[=HOST][,bootstrap_port=N][,bootstrap_host=ADDR]``; ``HOST`` is a host (or
instance) name of the topology file; without a topology every worker host sits on one leaf.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from netkv.config import (
    KvSizeSettings,
    LogLevel,
    MqttSettings,
    PolicyName,
    Port,
    RedisSettings,
    Section,
    ServiceSettings,
    load_settings,
)
from netkv.errors import InputError
from netkv.eventloop import LoopChoice, add_loop_argument, resolve
from netkv.http.server import HttpLimitsSettings
from netkv.prompts import VLLM_BLOCK_TOKENS

Mode = Literal["pull", "push", "bootstrap"]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class WorkerEntry(Section):
    """One prefill or decode worker: its base URL and its host name in the topology."""

    url: str
    host: str | None = None
    bootstrap_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bootstrap_host: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://HOST:PORT, got {url!r}")
        return url

    @property
    def base(self) -> str:
        return self.url.rstrip("/").removesuffix("/v1")

    @property
    def host_name(self) -> str:
        return self.host or (urlsplit(self.url).hostname or "")


class ProxySettings(ServiceSettings, KvSizeSettings, HttpLimitsSettings):
    """Everything the proxy needs. ``map_stale_s``: past this age the congestion map is
    ignored and decisions use the tier priors (said in ``x-netkv-map`` and the metrics)."""

    SECTION: ClassVar[str] = "proxy"
    CONNECTION_CAP: ClassVar[str] = "max_client_connections"
    host: str = "127.0.0.1"
    port: Port = 8000
    prefill: tuple[WorkerEntry, ...] = ()
    decode: tuple[WorkerEntry, ...] = ()
    mode: Mode = "pull"
    policy: PolicyName = "netkv"
    policy_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    topology: str | None = None
    redis: RedisSettings | None = None
    mqtt: MqttSettings | None = None
    capacity_tokens: Positive = 500_000.0
    block_size: int = Field(default=VLLM_BLOCK_TOKENS, ge=1, le=65536)
    tokenizer: str | None = None
    prefix_blocks: int = Field(default=200_000, ge=0)
    default_max_tokens: int = Field(default=16, ge=1)
    prefill_timeout_s: Positive = 30.0
    prefill_retries: int = Field(default=2, ge=0, le=10)
    connect_timeout_s: Positive = 3.0
    decode_read_timeout_s: Positive = 120.0
    health_interval_s: Positive = 1.0
    health_timeout_s: Positive = 1.0
    eject_after: int = Field(default=2, ge=1)
    readmit_after: int = Field(default=2, ge=1)
    map_stale_s: Positive = 10.0
    map_poll_s: Positive = 2.0
    redis_timeout_s: Positive = 1.0
    oracle_cache_s: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    max_body_bytes: int = Field(default=32 << 20, ge=1024)
    max_connections: int = Field(default=1000, ge=1)  # upstream, to each worker
    # The client side (issue 9): HttpLimitsSettings, capped by max_client_connections.
    max_client_connections: int = Field(default=4096, ge=16)
    log_level: LogLevel = "info"
    loop: LoopChoice = "auto"  # the event loop (netkv.eventloop): auto = uvloop if installed
    # the client-facing HTTP server: h1 (netkv.http.h1, httptools on an asyncio Protocol) or
    # aiohttp (netkv.http.server); the same routes, limits and answers on both
    front: Literal["h1", "aiohttp"] = "h1"

    @model_validator(mode="after")
    def _workers(self) -> ProxySettings:
        resolve(self.loop, "loop")  # uvloop named but not installed: an error, at start-up
        if not self.prefill:
            raise InputError("prefill", "name at least one prefill worker")
        if not self.decode:
            raise InputError("decode", "name at least one decode worker")
        if self.mode == "bootstrap":
            for i, w in enumerate(self.prefill):
                if w.bootstrap_port is None:
                    raise InputError(f"prefill.{i}.bootstrap_port",
                                     "bootstrap mode needs every prefill's bootstrap port")
        urls = [w.base for w in (*self.prefill, *self.decode)]
        if len(set(urls)) != len(urls):
            raise InputError("prefill", "a worker URL is given twice")
        return self


def parse_worker(text: str, flag: str) -> dict[str, Any]:
    """``URL[=HOST][,bootstrap_port=N][,bootstrap_host=ADDR]`` as a config entry."""
    head, *opts = text.split(",")
    url, _, host = head.partition("=")
    entry: dict[str, Any] = {"url": url}
    if host:
        entry["host"] = host
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "bootstrap_port" and value.isdigit():
            entry["bootstrap_port"] = int(value)
        elif key == "bootstrap_host" and value:
            entry["bootstrap_host"] = value
        else:
            raise InputError(flag, f"unknown worker option {opt!r} in {text!r} (known: "
                             "bootstrap_port=N, bootstrap_host=ADDR)")
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (YAML/JSON) with a proxy section")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000; 0 = any free)")
    parser.add_argument("--prefill", action="append", metavar="URL[=HOST]",
                        help="a prefill worker (repeat the flag for more)")
    parser.add_argument("--decode", action="append", metavar="URL[=HOST]",
                        help="a decode worker (repeat the flag for more)")
    parser.add_argument("--mode", choices=("pull", "push", "bootstrap"),
                        help="pull: vLLM NixlConnector (default); push: vLLM WRITE; "
                        "bootstrap: SGLang (the pair is chosen before prefill)")
    parser.add_argument("--policy", help="decode policy (default netkv; netkv_pair in "
                        "bootstrap mode chooses the pair)")
    parser.add_argument("--topology", help="topology file naming the workers' hosts")
    parser.add_argument("--block-size", type=int, help="prefix block size in tokens (vLLM "
                        f"default {VLLM_BLOCK_TOKENS})")
    parser.add_argument("--tokenizer", help="a local tokenizer.json for text prompts")
    parser.add_argument("--kv-bytes-per-token", type=float,
                        help="KV bytes per prompt token (default: the model preset's)")
    parser.add_argument("--redis-url", help="the congestion map's Redis (enables the map)")
    parser.add_argument("--mqtt-host", help="the map announcements' broker")
    parser.add_argument("--front", choices=("h1", "aiohttp"),
                        help="the client-facing HTTP server: h1 (default; httptools) or "
                        "aiohttp")
    add_loop_argument(parser, what="the proxy")


def settings_from(args: argparse.Namespace) -> ProxySettings:
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in (
        "host", "port", "mode", "policy", "topology", "block_size", "tokenizer",
        "kv_bytes_per_token", "loop", "front")}
    for role in ("prefill", "decode"):
        given: Sequence[str] | None = getattr(args, role, None)
        if given:
            overrides[role] = [parse_worker(t, f"--{role}") for t in given]
    if getattr(args, "redis_url", None):
        overrides["redis"] = {"url": args.redis_url}
    if getattr(args, "mqtt_host", None):
        host, _, port = str(args.mqtt_host).partition(":")
        overrides["mqtt"] = {"host": host, **({"port": int(port)} if port.isdigit() else {})}
    config = getattr(args, "config", None)
    env: Mapping[str, str] = getattr(args, "environ", {})
    return load_settings(ProxySettings, "proxy", Path(config) if config else None, env,
                         overrides)
