"""start_web: uvicorn in a thread of the node process, stopped by the function it returns."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from support.net import free_port
from web_helpers import TOKEN, web_settings

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.web.server import start_web


def test_start_serve_stop_and_port_taken(
    sqlite_database: Database, spool: Spool, tmp_path: Path
) -> None:
    settings = web_settings(tmp_path, "sqlite://", host="127.0.0.1", port=free_port())
    stop = start_web(settings, sqlite_database, spool)
    base = f"http://127.0.0.1:{settings.web.port}"
    try:
        assert httpx.get(base + "/healthz").json()["status"] == "ok"
        assert httpx.get(base + "/api/worklist").status_code == 401
        ok = httpx.get(base + "/api/worklist", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["total"] == 0
        assert "server" not in ok.headers  # no software banner
    finally:
        stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/healthz", timeout=2)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = web_settings(tmp_path, "sqlite://", host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(OSError, match="could not listen"):
            start_web(busy, sqlite_database, spool)
