"""Emulated inference engines that speak vLLM's OpenAI and disaggregation protocols.

``netkv engine --role prefill|decode`` serves one instance: ``/v1/completions`` and
``/v1/chat/completions`` (SSE streaming and not), ``/v1/models``, ``/health`` and ``/metrics``
with vLLM's metric names. A prefill asked with ``kv_transfer_params.do_remote_decode`` answers
with the ``kv_transfer_params`` of vLLM's NixlConnector and holds the KV for a lease on a TCP
side channel; a decode given those params pulls the (scaled) KV bytes from
``remote_host:remote_port`` before its first token. SGLang's bootstrap flow (the decode known
before the prefill) is served too.

Compute is modelled: there are no GPUs here, so a prefill takes ``overhead + tokens / rate``
seconds and a decode step a fixed time (:class:`~netkv.engine.model.EngineModel`). The HTTP
surface, the parameters, the KV bytes on the wire and the metrics are real.
"""
