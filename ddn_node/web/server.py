"""Running the web app inside ``ddn-node serve``: uvicorn in a thread of the node process.

With ``[web] tls_cert`` and ``tls_key`` it serves HTTPS itself: TLS 1.2 or newer, forward
secret AEAD cipher suites only (BCP 195), no client certificates (users log in).
"""

from __future__ import annotations

import gc
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import uvicorn

from ddn_node.config import Settings
from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.web.app import create_app

log = structlog.get_logger("ddn_node.web")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# TLS 1.2 suites: ECDHE key exchange, AES-GCM or ChaCha20-Poly1305 (TLS 1.3's own suites
# are all of that kind and are not affected by this list).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of the node's HTTPS. Raises OSError / ssl.SSLError when the files
    cannot be read or do not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(str(cert), str(key))
    return context


def start_web(settings: Settings, database: Database, spool: Spool) -> Callable[[], None]:
    """Start serving on ``[web] host:port``; returns the function that stops the server.

    Raises OSError when the server cannot listen (port taken), so ``serve`` reports it.
    """
    app = create_app(settings, database, spool)
    web = settings.web
    https: dict[str, object] = {}
    if web.tls_cert is not None and web.tls_key is not None:
        # Built here, not by uvicorn: its default would also allow the TLS 1.2 CBC suites.
        context = tls_context(web.tls_cert, web.tls_key)
        https = {
            "ssl_certfile": str(web.tls_cert),
            "ssl_keyfile": str(web.tls_key),
            "ssl_context_factory": lambda _config, _default: context,
        }
    config = uvicorn.Config(
        app,
        host=settings.web.host,
        port=settings.web.port,
        # The node configured logging already (JSON through structlog); uvicorn's own
        # dictConfig would replace it.
        log_config=None,
        access_log=False,
        server_header=False,
        # Sessions and tokens are checked per request; a slow client must not hold a
        # worker for long.
        timeout_keep_alive=15,
        lifespan="off",
        **https,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    # Everything allocated so far (the node's modules, the app, a loaded model) lives as
    # long as the process: moved out of the collector's sight, a full collection no longer
    # walks ~150,000 objects in the middle of a request (a 20-30 ms pause, measured).
    gc.freeze()

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:
            # uvicorn exits its (our) thread when it cannot listen; it has logged why.
            log.error("web.server_exited", code=exc.code)

    thread = threading.Thread(target=run, name="web", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"web server could not listen on {settings.web.host}:{settings.web.port}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"web server did not start within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    log.info(
        "web.started",
        host=settings.web.host,
        port=settings.web.port,
        https=web.tls_cert is not None,
        behind_https_proxy=web.behind_https_proxy,
    )

    def stop() -> None:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            # Long-lived connections (a browser polling) get a forced close.
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        log.info("web.stopped")

    return stop
