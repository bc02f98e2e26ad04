"""The instances of a run: prefill instances (FIFO, prefix caches) and decoders (admission
queue, batch, prefix cache), with the arrays a router sees of them."""

from __future__ import annotations

from collections import deque

import numpy as np

from netkv.core.policies import CandidateView
from netkv.core.prefix_cache import PrefixCache
from netkv.core.topology import FloatArray, IntArray


class PrefillPool:
    """Prefill instances: one FIFO queue each, one request computing at a time."""

    def __init__(self, host: IntArray, cache_blocks: list[int], n_requests: int) -> None:
        n = host.shape[0]
        self.host = host
        self.caches = [PrefixCache(c) for c in cache_blocks]
        self.queue: list[deque[int]] = [deque() for _ in range(n)]
        self.busy_until = np.zeros(n)
        self.backlog = np.zeros(n)  # estimated compute of queued, not started, requests
        self.estimate = np.zeros(n_requests)
        self.active = np.full(n, -1, np.int64)

    def __len__(self) -> int:
        return int(self.host.shape[0])

    def wait(self, now: float) -> FloatArray:
        """Predicted time from ``now`` until each instance could start a new request."""
        out: FloatArray = np.maximum(self.busy_until - now, 0.0) + self.backlog
        return out

    def enqueue(self, p: int, r: int, compute_s: float) -> None:
        self.estimate[r] = compute_s
        self.backlog[p] += compute_s
        self.queue[p].append(r)

    def next_to_start(self, p: int) -> int:
        """The request instance ``p`` starts now, or -1 if it is busy or has nothing queued."""
        if self.active[p] >= 0 or not self.queue[p]:
            return -1
        r = self.queue[p].popleft()
        self.backlog[p] -= self.estimate[r]
        return r


class Decoder:
    __slots__ = ("batch", "cache", "capacity", "ctx", "host", "last", "need", "queue",
                 "step_s", "version")

    def __init__(self, host: int, capacity: float, cache_blocks: int) -> None:
        self.host = host
        self.capacity = capacity
        self.cache = PrefixCache(cache_blocks)
        self.queue: deque[int] = deque()
        self.batch: dict[int, float] = {}  # request -> output tokens still to produce
        self.ctx = 0.0  # KV tokens the batch reads per step
        self.need = 0.0
        self.last = 0.0
        self.step_s = 0.0
        self.version = 0

    def advance(self, now: float) -> None:
        """Every running request has produced one token per step since ``last``."""
        if self.batch and now > self.last:
            steps = (now - self.last) / self.step_s
            for r in self.batch:
                self.batch[r] -= steps
        self.last = now


class DecodePool:
    """Decoders and the load counters a router keeps for them."""

    def __init__(self, host: IntArray, capacity: FloatArray, cache_blocks: list[int],
                 step_s: FloatArray, nic_bytes_s: FloatArray | None = None) -> None:
        n = host.shape[0]
        self.host = host
        self.nic_bytes_s = nic_bytes_s
        self.capacity = capacity
        self.decoders = [Decoder(int(h), float(c), b)
                         for h, c, b in zip(host, capacity, cache_blocks, strict=True)]
        self.running = np.zeros(n, np.int64)
        self.waiting = np.zeros(n, np.int64)
        self.used = np.zeros(n)
        self.waiting_tokens = np.zeros(n)
        self.step_s = step_s.copy()
        self.nic_booked_bytes = np.zeros(n)  # booked transfers into each decoder's NICs
        self.nic_booked_flows = np.zeros(n)
        for d, dec in enumerate(self.decoders):
            dec.step_s = float(self.step_s[d])

    def __len__(self) -> int:
        return int(self.host.shape[0])

    def view(self) -> CandidateView:
        return CandidateView(host=self.host, running=self.running, waiting=self.waiting,
                             kv_use=self.used / self.capacity,
                             capacity_tokens=self.capacity, tbt_s=self.step_s,
                             waiting_tokens=self.waiting_tokens, nic_bytes_s=self.nic_bytes_s,
                             nic_booked_bytes=self.nic_booked_bytes,
                             nic_booked_flows=self.nic_booked_flows)

    def book(self, d: int, nbytes: float) -> None:
        """Count (``nbytes`` > 0) or release (< 0) a transfer booked into ``d``'s NICs."""
        self.nic_booked_bytes[d] = max(self.nic_booked_bytes[d] + nbytes, 0.0)
        self.nic_booked_flows[d] += 1.0 if nbytes > 0 else -1.0

    def enqueue(self, d: int, r: int, need: float) -> None:
        self.decoders[d].queue.append(r)
        self.waiting[d] += 1
        self.waiting_tokens[d] += need

    def admit_next(self, d: int, need: FloatArray) -> int:
        """Admit the head of ``d``'s queue if its KV fits (or the decoder is empty); the
        request, or -1."""
        dec = self.decoders[d]
        if not dec.queue:
            return -1
        r = dec.queue[0]
        if self.used[d] + need[r] > dec.capacity and self.used[d] > 0:
            return -1
        dec.queue.popleft()
        self.waiting[d] -= 1
        self.waiting_tokens[d] -= need[r]
        self.running[d] += 1
        self.used[d] += need[r]
        return r

    def finish(self, d: int, r: int, need: float, ctx: float) -> None:
        dec = self.decoders[d]
        del dec.batch[r]
        dec.ctx -= ctx
        self.used[d] -= need
        self.running[d] -= 1
