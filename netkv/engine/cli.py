"""``netkv engine --role prefill|decode``: one emulated engine instance (see
:mod:`netkv.engine`). Prints one line ``engine ROLE ready: URL side_channel=PORT`` once it
serves (tests and scripts read the ports from it when they ask for port 0)."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from dataclasses import replace

from netkv.contracts.kvtransfer import DEFAULT_KV_LEASE_S, DEFAULT_SIDE_CHANNEL_PORT
from netkv.engine.model import EngineModel
from netkv.engine.server import Engine, EngineSettings
from netkv.fields import from_mapping
from netkv.logs import configure_logging
from netkv.prompts import VLLM_BLOCK_TOKENS
from netkv.signals import stop_on_signals


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", required=True, choices=("prefill", "decode"))
    parser.add_argument("--model-name", default="netkv/emulated",
                        help="the served model name (/v1/models)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free)")
    parser.add_argument("--side-channel-host", help="address announced as remote_host "
                        "(default: --host)")
    parser.add_argument("--side-channel-port", type=int, default=DEFAULT_SIDE_CHANNEL_PORT,
                        help="KV side channel port (vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT "
                        f"default {DEFAULT_SIDE_CHANNEL_PORT}; 0: any free)")
    parser.add_argument("--engine-id", help="remote_engine_id (default: a random UUID)")
    parser.add_argument("--block-size", type=int, default=VLLM_BLOCK_TOKENS,
                        help=f"tokens per KV block (vLLM's default {VLLM_BLOCK_TOKENS})")
    parser.add_argument("--kv-lease-s", type=float, default=DEFAULT_KV_LEASE_S,
                        help="how long a prefill holds KV nobody read (vLLM: 30 s)")
    parser.add_argument("--tokenizer", help="a local tokenizer.json for text prompts "
                        "(default: the four-bytes-per-token approximation)")
    model = parser.add_argument_group("modelled compute (no GPUs; see netkv.engine.model)")
    defaults = EngineModel()
    model.add_argument("--kv-bytes-per-token", type=float, default=64.0,
                       help="KV bytes moved per prompt token (scaled; default 64)")
    model.add_argument("--prefill-tokens-per-s", type=float,
                       default=defaults.prefill_tokens_per_s)
    model.add_argument("--prefill-overhead-s", type=float, default=defaults.prefill_overhead_s)
    model.add_argument("--decode-step-s", type=float, default=defaults.decode_step_s,
                       help="first decoded token after the KV is in")
    model.add_argument("--tpot-s", type=float, default=defaults.tpot_s,
                       help="time per further output token")
    model.add_argument("--decode-slots", type=int, default=defaults.decode_slots)
    model.add_argument("--capacity-tokens", type=float, default=defaults.capacity_tokens)
    parser.add_argument("--max-model-len", type=int, default=131_072,
                        help="prompt + output tokens a request may hold (vLLM's flag)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens per streamed write after the first (vLLM's "
                        "--stream-interval; default 1)")
    parser.add_argument("--test-hooks", action="store_true",
                        help="enable POST /netkv/faults and GET /netkv/requests (tests only)")


def settings_from(args: argparse.Namespace) -> EngineSettings:
    model = from_mapping(EngineModel, {
        "prefill_tokens_per_s": args.prefill_tokens_per_s,
        "prefill_overhead_s": args.prefill_overhead_s, "decode_step_s": args.decode_step_s,
        "tpot_s": args.tpot_s, "decode_slots": args.decode_slots,
        "bytes_per_token": args.kv_bytes_per_token, "capacity_tokens": args.capacity_tokens,
    }, "engine")
    return EngineSettings(
        role=args.role, model_name=args.model_name, host=args.host, port=args.port,
        side_channel_host=args.side_channel_host, side_channel_port=args.side_channel_port,
        engine_id=args.engine_id or str(uuid.uuid4()), block_size=args.block_size,
        lease_s=args.kv_lease_s, tokenizer=args.tokenizer, test_hooks=args.test_hooks,
        record_requests=64 if args.test_hooks else 0, stream_interval=args.stream_interval,
        max_model_len=args.max_model_len,
        model=replace(model))


async def serve(settings: EngineSettings) -> None:
    with stop_on_signals() as stop:
        async with Engine(settings) as engine:
            print(f"engine {settings.role} ready: {engine.url} "
                  f"side_channel={engine.side_channel_port}", flush=True)
            await stop.wait()


def run(args: argparse.Namespace) -> int:
    configure_logging()
    asyncio.run(serve(settings_from(args)))
    return 0
