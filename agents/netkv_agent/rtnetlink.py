"""A minimal rtnetlink socket for the three requests the agent's counter reads make.

Why not pyroute2 here: the agent reads counters several times a second, and pyroute2's
generic message classes (encode, decode of every attribute, an asyncio round trip per
request) were about half of the agent's CPU at a 0.1 s counter interval. The three requests
below have fixed layouts, so we build them once with :mod:`struct` and unpack only the fields
we use:

* ``RTM_GETLINK`` by ``IFLA_IFNAME``: interface name -> ifindex (inside the socket's netns);
  by index: the interface's flags (``IFF_UP``/``IFF_RUNNING``: its operational state);
* ``RTM_GETSTATS`` with ``IFLA_STATS_LINK_64`` only: the 64-bit link counters;
* ``RTM_GETQDISC`` for parent ``TC_H_ROOT`` (a *get*, not a dump of every qdisc of the
  namespace): the root qdisc's handle and ``TCA_STATS2``/``TCA_STATS_QUEUE`` (legacy
  ``TCA_STATS`` as a fallback), its kind and, for a ``tbf``, its rate. Built-in roots
  (``noqueue``) are not reported, as in a dump (the kernel answers nothing or EINVAL: no
  sample).

The kernel answers rtnetlink requests synchronously inside ``send``, so the reply is already
queued when ``recv`` runs: no event-loop round trip is needed. A receive timeout bounds the
pathological case, and replies are matched by sequence number (a late reply to an earlier,
timed-out request is skipped). Errors come back as :class:`OSError` with the kernel's errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pyroute2.netns import popns, pushns

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8  # tc answers a get as a notification: echo it to the requester
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWQDISC, RTM_GETQDISC = 36, 38
RTM_NEWSTATS, RTM_GETSTATS = 92, 94
IFLA_IFNAME = 3
IFF_UP, IFF_RUNNING = 0x1, 0x40
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_TBF_PARMS, TCA_TBF_RATE64 = 1, 6
IFLA_STATS_LINK_64 = 1
TCA_STATS, TCA_STATS2 = 3, 7
TCA_STATS_QUEUE = 3
TC_H_ROOT = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IF_STATS_MSG = struct.Struct("=BxxxII")  # family, ifindex, filter_mask
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_RTATTR = struct.Struct("=HH")  # len, type
# rtnl_link_stats64 begins with these eight u64 counters, in this order.
_LINK64 = struct.Struct("=8Q")
LINK64_FIELDS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors",
                 "tx_errors", "rx_dropped", "tx_dropped")
_GNET_QUEUE = struct.Struct("=III")  # qlen, backlog, drops (then requeues, overlimits)
# tc_tbf_qopt begins with struct tc_ratespec rate: cell_log, linklayer, overhead, cell_align,
# mpu, rate (bytes/s, 32 bits; TCA_TBF_RATE64 carries rates above 4 GB/s)
_TC_RATESPEC = struct.Struct("=BBHhHI")
_U64 = struct.Struct("=Q")
_TC_STATS = struct.Struct("=QIIIIIII")  # bytes, packets, drops, overlimits, bps, pps, qlen,
# backlog
RECV_TIMEOUT_S = 0.5
RECV_BYTES = 65536


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(data: bytes | memoryview, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each rtattr in ``data[offset:end]``."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, offset + _RTATTR.size, offset + length  # drop NLA_F_* bits
        offset += _align(length)


@dataclass(frozen=True, slots=True)
class RootQdisc:
    """An interface's root qdisc: handle, queue state, kind and (``tbf``) shaping rate."""

    handle: int
    backlog: int
    qlen: int
    drops: int
    kind: str = ""
    rate_bytes_s: float = 0.0  # a tbf's rate; 0 for other kinds


# Errors with which the kernel says the interface asked about does not exist (any more).
_GONE = frozenset({errno.ENODEV, errno.ENOENT})

class RouteSocket:
    """One NETLINK_ROUTE socket, opened in ``netns`` (a named namespace) when given."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0

    def open(self) -> None:
        if self.netns is None:
            self._sock = self._socket()
            return
        pushns(self.netns)  # setns for this thread only, then back
        try:
            self._sock = self._socket()
        finally:
            popns()

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_ROUTE)
        sock.settimeout(RECV_TIMEOUT_S)
        sock.bind((0, 0))
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    # -- one request, one reply -------------------------------------------------------------
    def request(self, kind: int, body: bytes, reply: int, flags: int = 0) -> bytes | None:
        """Send one request; return the payload (after the netlink header) of its reply.

        With ``NLM_F_ACK`` in ``flags`` the kernel always ends with an acknowledgement, so a
        request it answers with nothing returns None instead of waiting for the timeout.
        """
        if self._sock is None:
            raise OSError(errno.EBADF, "route socket is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                       NLM_F_REQUEST | flags, seq, 0) + body)
        found: bytes | None = None
        while True:
            data = self._sock.recv(RECV_BYTES)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                start, offset = offset + _NLMSGHDR.size, offset + _align(length)
                if mseq != seq:
                    continue  # a late answer to an earlier request
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, start)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return found  # the acknowledgement ends the exchange
                if mtype == reply:
                    found = data[start:start + length - _NLMSGHDR.size]
                    if not flags & NLM_F_ACK:
                        return found

    def request_if_present(self, kind: int, body: bytes, reply: int, flags: int = 0,
                           absent: frozenset[int] = _GONE) -> bytes | None:
        """:meth:`request`, with an object the kernel says is not there (an error in
        ``absent``, e.g. a vanished interface) answered by None instead of an error."""
        try:
            return self.request(kind, body, reply, flags)
        except OSError as exc:
            if exc.errno in absent:
                return None
            raise

    def link_index(self, name: str) -> int | None:
        """The ifindex of interface ``name``, or None if there is none."""
        encoded = name.encode() + b"\0"
        attr = _RTATTR.pack(_RTATTR.size + len(encoded), IFLA_IFNAME) + encoded
        attr += b"\0" * (_align(len(attr)) - len(attr))
        reply = self.request_if_present(RTM_GETLINK, _IFINFOMSG.pack(0, 0, 0, 0, 0) + attr,
                                        RTM_NEWLINK)
        if reply is None:
            return None
        return int(_IFINFOMSG.unpack_from(reply)[2])

    def link_flags(self, index: int) -> int | None:
        """The interface's ``ifi_flags`` (``IFF_*``), or None if it is gone."""
        reply = self.request_if_present(RTM_GETLINK, _IFINFOMSG.pack(0, 0, index, 0, 0),
                                        RTM_NEWLINK)
        if reply is None:
            return None
        return int(_IFINFOMSG.unpack_from(reply)[3])

    def link_stats64(self, index: int) -> dict[str, int] | None:
        """The interface's 64-bit counters, or None if it is gone."""
        reply = self.request_if_present(RTM_GETSTATS, _IF_STATS_MSG.pack(0, index, 1 << (
            IFLA_STATS_LINK_64 - 1)), RTM_NEWSTATS)
        if reply is None:
            return None
        for kind, start, end in attributes(reply, _IF_STATS_MSG.size, len(reply)):
            if kind == IFLA_STATS_LINK_64 and end - start >= _LINK64.size:
                return dict(zip(LINK64_FIELDS, _LINK64.unpack_from(reply, start),
                                strict=True))
        return None

    def root_qdisc(self, index: int) -> tuple[int, int, int, int] | None:
        """(handle, backlog bytes, backlog packets, drops) of the interface's root qdisc."""
        info = self.root_qdisc_info(index)
        return None if info is None else (info.handle, info.backlog, info.qlen, info.drops)

    def root_qdisc_info(self, index: int) -> RootQdisc | None:
        """The interface's root qdisc (None: gone, or a built-in root)."""
        # EINVAL too: the kernel's answer for an interface whose root qdisc it cannot show.
        reply = self.request_if_present(RTM_GETQDISC, _TCMSG.pack(0, index, 0, TC_H_ROOT, 0),
                                        RTM_NEWQDISC, NLM_F_ECHO | NLM_F_ACK,
                                        absent=_GONE | {errno.EINVAL})
        if reply is None:
            return None
        handle = int(_TCMSG.unpack_from(reply)[2])
        queue: tuple[int, int, int] | None = None
        legacy: tuple[int, int, int] | None = None
        kind, rate = "", 0.0
        for attr, start, end in attributes(reply, _TCMSG.size, len(reply)):
            if attr == TCA_KIND:
                kind = bytes(reply[start:end]).rstrip(b"\0").decode(errors="replace")
            elif attr == TCA_OPTIONS:
                rate = _tbf_rate(reply, start, end) if kind == "tbf" else 0.0
            elif attr == TCA_STATS2:
                for sub, s, e in attributes(reply, start, end):
                    if sub == TCA_STATS_QUEUE and e - s >= _GNET_QUEUE.size:
                        qlen, backlog, drops = _GNET_QUEUE.unpack_from(reply, s)
                        queue = backlog, qlen, drops
            elif attr == TCA_STATS and end - start >= _TC_STATS.size:
                fields = _TC_STATS.unpack_from(reply, start)
                legacy = fields[7], fields[6], fields[2]
        found = queue or legacy
        if found is None:
            return None
        return RootQdisc(handle, *found, kind=kind, rate_bytes_s=rate)


def _tbf_rate(data: bytes, start: int, end: int) -> float:
    """A tbf's rate in bytes/s from its TCA_OPTIONS (the 64-bit attribute wins)."""
    rate = 0.0
    for attr, s, e in attributes(data, start, end):
        if attr == TCA_TBF_PARMS and e - s >= _TC_RATESPEC.size:
            rate = rate or float(_TC_RATESPEC.unpack_from(data, s)[5])
        elif attr == TCA_TBF_RATE64 and e - s >= _U64.size:
            rate = float(_U64.unpack_from(data, s)[0])
    return rate
