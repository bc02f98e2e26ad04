"""Decode-instance routing shared by every router process (no HTTP here).

The scheduler service serves it over HTTP; the P/D proxy calls it in-process. One concept per
module:

* :mod:`netkv.routing.requests`: :class:`SelectRequest`, :class:`ReleaseRequest`,
  :class:`InstanceReport` (one typed definition each, with the defaults and bounds);
* :mod:`netkv.routing.mapfeed`: :class:`MapFeed`, the live congestion map (Redis + MQTT);
* :mod:`netkv.routing.instances`: :class:`InstanceRegistry`, instances and their load;
* :mod:`netkv.routing.scrape`: engine load from a vLLM Prometheus endpoint;
* :mod:`netkv.routing.prefixes`: :class:`PrefixIndex`, which decoder holds which blocks;
* :mod:`netkv.routing.reservations`: :class:`Reservations`, bookings until release/expiry;
* :mod:`netkv.routing.candidates`: :class:`CandidateViews` (one candidate view kept across
  decisions) and :func:`decision_engine`, shared by the selector and the proxy's placement;
* :mod:`netkv.routing.selector`: :class:`Selector` and :class:`SelectorConfig`, the glue
  that turns a request into a :class:`Choice` with the policy engines;
* :mod:`netkv.routing.fused`: :class:`~netkv.routing.fused.FusedNetkv`, ``netkv``'s
  decision for the selector's inputs in fewer array calls (the policy's numbers bit for bit);
* :mod:`netkv.routing.runtime`: :func:`spawn_routing`, the background loops under a
  :class:`~netkv.supervisor.Supervisor`.
"""

from netkv.routing.instances import InstanceInfo, InstanceRegistry, Load
from netkv.routing.mapfeed import MapFeed, MapView
from netkv.routing.requests import InstanceReport, ReleaseRequest, SelectRequest
from netkv.routing.runtime import spawn_routing
from netkv.routing.selector import Choice, Selector, SelectorConfig

__all__ = [
    "Choice",
    "InstanceInfo",
    "InstanceRegistry",
    "InstanceReport",
    "Load",
    "MapFeed",
    "MapView",
    "ReleaseRequest",
    "SelectRequest",
    "Selector",
    "SelectorConfig",
    "spawn_routing",
]
