"""When KV transfer time reaches TTFT: pulled after prefill, or streamed layer by layer.

With layer-wise streaming (Mooncake's layer-wise prefill, push connectors) layer ``l`` of
``L`` is ready ``T * l / L`` after prefill starts and the layers leave in order at rate
``R``: layer ``l`` finishes at ``F_l = max(F_{l-1}, T * l / L) + B / (L * R)``. The part of
the transfer that prefill cannot hide is ``F_L - T``, and because ``F_L`` is the largest of
``T * k / L + (L - k + 1) * B / (L * R)`` over ``k`` (linear in ``k``, so an end point
wins)::

    exposed = max(B / (L * R), B / R - T * (L - 1) / L)

the last layer's own transfer when the network keeps up, else the excess of the transfer
over the prefill (less one layer). Pulling after prefill exposes all of ``B / R``.
"""

from __future__ import annotations


def layerwise_exposed_s(nbytes: float, rate_bytes_s: float, prefill_s: float,
                        layers: int) -> float:
    """Seconds of a streamed transfer left after prefill ends (see the module docstring)."""
    if layers < 1:
        raise ValueError("layers must be >= 1")
    if rate_bytes_s <= 0:
        raise ValueError("rate must be > 0")
    if nbytes <= 0:
        return 0.0
    whole = nbytes / rate_bytes_s
    return max(whole / layers, whole - prefill_s * (layers - 1) / layers)


def pulled_exposed_s(nbytes: float, rate_bytes_s: float, handover_s: float = 0.0) -> float:
    """A pull after prefill: the fixed handover plus all of the bytes."""
    if rate_bytes_s <= 0:
        raise ValueError("rate must be > 0")
    return handover_s + max(nbytes, 0.0) / rate_bytes_s
