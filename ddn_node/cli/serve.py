"""``ddn-node serve``: run the node until SIGTERM / SIGINT, then stop every part cleanly."""

from __future__ import annotations

import signal
import threading
from typing import Any

import structlog

from ddn_node.config import Settings
from ddn_node.node import ROLES, StartupError, start_node

log = structlog.get_logger("ddn_node.serve")

__all__ = ["ROLES", "StartupError", "serve_forever"]


def serve_forever(settings: Settings, roles: frozenset[str]) -> None:
    """Run until SIGTERM / SIGINT, then stop every part cleanly."""
    # Handlers first: a SIGTERM while the parts start must still stop them cleanly.
    shutdown = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("serve.signal", signal=signal.Signals(signum).name)
        shutdown.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node = start_node(settings, roles, shutdown)
    while not shutdown.wait(1.0):
        pass
    node.stop()
    if node.failure:
        raise StartupError(node.failure)
