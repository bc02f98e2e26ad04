"""The background work a router needs besides its decisions, owned by one Supervisor.

A router (the scheduler service, the P/D proxy) calls :func:`spawn_routing` once inside its
``async with Supervisor(...)``: the map feed's loops, the engine-load scraper and the booking
sweeper all run there, so a loop that dies shows in the supervisor's ``failures`` (readiness)
instead of vanishing.
"""

from __future__ import annotations

import asyncio

from netkv.routing.scrape import MAX_SCRAPE_BYTES, scrape_forever
from netkv.routing.selector import Selector
from netkv.supervisor import Supervisor


async def sweep_forever(selector: Selector, every_s: float = 1.0) -> None:
    """Hand back expired bookings and ended transfers even when no decision does."""
    while True:
        await asyncio.sleep(every_s)
        selector.sweep()


def spawn_routing(supervisor: Supervisor, selector: Selector, *, scrape_interval_s: float,
                  scrape_timeout_s: float, max_scrape_bytes: int = MAX_SCRAPE_BYTES) -> None:
    """Start the feed, the load scraper and the sweeper of ``selector`` under ``supervisor``."""
    selector.feed.spawn(supervisor)
    supervisor.spawn(scrape_forever(selector.registry, scrape_interval_s, scrape_timeout_s,
                                    max_scrape_bytes), name="load-scraper")
    supervisor.spawn(sweep_forever(selector), name="reservation-sweeper")
