"""vLLM's disaggregation parameters as they cross the wire (one typed definition each).

* :class:`KVTransferParams` is the ``kv_transfer_params`` object of vLLM's KV connectors
  (``NixlConnector``): a P/D proxy sends the prefill ``{do_remote_decode: true,
  do_remote_prefill: false, remote_*: null}``; the prefill answers with where its KV waits
  (``do_remote_prefill: true``, ``remote_engine_id``, ``remote_request_id``,
  ``remote_block_ids``, ``remote_host``, ``remote_port`` = the NIXL side channel, ``tp_size``);
  the proxy copies that answer into the decode request and the decode reads the blocks.
  Newer vLLM versions return ``remote_block_ids`` as one list per KV-cache group; both shapes
  are accepted (:meth:`KVTransferParams.flat_block_ids`).
* SGLang's bootstrap fields (``bootstrap_host``, ``bootstrap_port``, ``bootstrap_room``) are
  top-level body fields; they live on the OpenAI request structs
  (:mod:`netkv.contracts.openai`).
* :func:`prefill_request_params` is what a proxy sends the prefill (vLLM's reference proxy,
  llm-d's sidecar and vllm-router send the same object).

Fields NetKV does not know stay in the raw body a proxy forwards; these structs validate, they
do not filter.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
BlockIds = list[Annotated[int, msgspec.Meta(ge=0)] | list[Annotated[int, msgspec.Meta(ge=0)]]]

# vLLM's default lease for KV held for a remote decode (kv_lease_duration /
# VLLM_NIXL_ABORT_REQUEST_TIMEOUT), in seconds.
DEFAULT_KV_LEASE_S = 30.0
# vLLM's default NIXL side-channel port (VLLM_NIXL_SIDE_CHANNEL_PORT).
DEFAULT_SIDE_CHANNEL_PORT = 5600
# SGLang's bootstrap room is a random 63-bit integer.
MAX_BOOTSTRAP_ROOM = (1 << 63) - 1


class KVTransferParams(msgspec.Struct, kw_only=True, omit_defaults=False):
    """``kv_transfer_params`` of a completion request or answer."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_block_ids: BlockIds | None = None
    remote_host: str | None = None
    remote_port: Port | None = None
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None

    def flat_block_ids(self) -> list[int]:
        """Block ids as one list (the first KV-cache group when vLLM sends one per group)."""
        ids = self.remote_block_ids or []
        if ids and isinstance(ids[0], list):
            return list(ids[0])
        return [i for i in ids if isinstance(i, int)]

    def pull_ready(self) -> bool:
        """True when a decode can read the KV: where and which blocks are all given."""
        return (self.do_remote_prefill and self.remote_host is not None
                and self.remote_port is not None and self.remote_request_id is not None)


def prefill_request_params() -> dict[str, Any]:
    """The ``kv_transfer_params`` a proxy sends the prefill in vLLM's pull flow."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def push_decode_params(prefill_answer: KVTransferParams) -> dict[str, Any]:
    """The decode's params in vLLM's push (WRITE) flow: the prefill's coordinates, no blocks
    (the decode registers with the prefill, which writes the blocks to it)."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": prefill_answer.remote_engine_id,
            "remote_request_id": prefill_answer.remote_request_id,
            "remote_host": prefill_answer.remote_host,
            "remote_port": prefill_answer.remote_port, "tp_size": prefill_answer.tp_size}
