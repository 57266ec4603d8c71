"""The local stand-in for Cloud Scheduler: publish ``scheduler-tick`` every few seconds.

Started by the local stack as its ``ticker`` component (``python -m fedcompute.stack.ticker``).
Each tick runs the scheduler function: assignment timeouts, stuck rounds re-published,
dead-lettered messages replayed. Interval: ``FEDCOMPUTE_SCHEDULER_TICK_S`` (default 30 s).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "FEDCOMPUTE_SCHEDULER_TICK_S"

log = logging.getLogger("ticker")


def interval_from_env() -> float:
    value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S) or DEFAULT_INTERVAL_S)
    return max(1.0, value)


def main(argv: list[str] | None = None) -> int:
    from fedcompute.adapters.clients import make_clients
    from fedcompute.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval", type=float, default=interval_from_env(), help="seconds between ticks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    publisher = make_clients(settings).publisher
    topic = publisher.topic_path(settings.project, settings.topics.scheduler_tick)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("ticking %s every %.0f s", topic, args.interval)
    while not stop.wait(args.interval):
        try:
            message_id = publisher.publish(topic, json.dumps({"time": time.time()}).encode()).result(timeout=10)
            log.info("tick published: %s", message_id)
        except Exception as error:  # noqa: BLE001 - keep ticking through an emulator hiccup
            log.warning("tick failed: %s", error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
