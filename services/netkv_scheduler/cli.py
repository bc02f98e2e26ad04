"""`netkv scheduler`: run the decode-selection HTTP service until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from netkv.http.server import serving
from netkv.logs import configure_logging
from netkv.signals import stop_on_signals
from netkv_scheduler.app import create_app
from netkv_scheduler.settings import SchedulerSettings, add_arguments, settings_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


async def serve(settings: SchedulerSettings) -> None:
    """Serve until a stop signal; the app's cleanup context stops its tasks in order."""
    app = create_app(settings)
    async with serving(app, settings.host, settings.port, settings.http_limits()) as served:
        print(json.dumps({"event": "listening", "service": "scheduler", "urls": served.urls}),
              flush=True)
        with stop_on_signals() as stop:
            await stop.wait()


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"netkv scheduler: cannot listen on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr)
        return 1
    return 0
