"""OHIF Viewer in front of a local Orthanc, for the demo and the viewer tests.

Why this exists: the radiologist sees the node's results (SR, Parametric Maps, Secondary
Captures) "in the ordinary viewer next to the original images"; OHIF is the open-source
viewer the design names, and the demo and the tests must show that it really draws them.

OHIF is a static web site (the prebuilt ``dist/`` folder of the npm package ``@ohif/app``,
fetched by ``deploy/fetch-ohif.sh`` into ``deploy/ohif/node_modules``) that speaks
DICOMweb from the browser. This module serves that site from a thread of the calling
process and forwards ``/dicom-web/*`` to Orthanc's DICOMweb plugin, so that:

- the browser sees one origin: Orthanc 1.10 sends no CORS headers, and nothing in
  Orthanc's configuration has to know about the viewer;
- the viewer configuration (``deploy/ohif/app-config.js``) uses relative DICOMweb roots
  and works on whatever port the viewer lands on; it is served in place of the one that
  ships in ``dist/``;
- the Host header is passed on, so the BulkDataURIs Orthanc writes into the metadata
  point back at this server (Orthanc builds them from the request's Host).

Any path of the single-page application that is not a file (``/viewer``,
``/viewer/dicomweb``...) is answered with ``index.html``, as OHIF's own deployments do.
Only GET and HEAD are served: the viewer reads, it never stores into the PACS.
"""

from __future__ import annotations

import http.client
import os
import shutil
import threading
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog

log = structlog.get_logger()

OHIF_VERSION = "3.13.2"
_REPO = Path(__file__).resolve().parents[2]
# Folder holding package.json, app-config.js and (once fetched) node_modules/@ohif/app.
# DDN_OHIF_HOME points elsewhere, for an installed (non-editable) node.
OHIF_HOME = Path(os.environ.get("DDN_OHIF_HOME", _REPO / "deploy" / "ohif"))
DICOMWEB_PREFIX = "/dicom-web"
_CHUNK = 256 * 1024
# Request headers that go on to Orthanc (the rest are the browser's business).
_FORWARD_REQUEST = (
    "accept",
    "accept-encoding",
    "range",
    "if-none-match",
    "if-modified-since",
    "host",
)
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing this server redoes itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class OhifError(RuntimeError):
    """OHIF is not installed where expected, or its server could not start."""


@dataclass(frozen=True)
class OhifSite:
    """Where the prebuilt viewer and its configuration are."""

    dist: Path
    config: Path

    @classmethod
    def at(cls, home: Path = OHIF_HOME) -> OhifSite:
        return cls(
            dist=home / "node_modules" / "@ohif" / "app" / "dist", config=home / "app-config.js"
        )

    @property
    def missing(self) -> str | None:
        """Why the site cannot be served, or None when it can."""
        if not (self.dist / "index.html").is_file():
            return f"OHIF {OHIF_VERSION} is not installed at {self.dist} (run deploy/fetch-ohif.sh)"
        if not self.config.is_file():
            return f"the OHIF configuration {self.config} is missing"
        return None


def ohif_available(site: OhifSite | None = None) -> bool:
    return (site or OhifSite.at()).missing is None


def viewer_path(
    study_instance_uid: str,
    series_instance_uids: list[str] | None = None,
    *,
    initial_series_instance_uid: str | None = None,
) -> str:
    """The path (and query) that opens one study in OHIF's basic viewer.

    ``series_instance_uids`` limits the study to those series; ``initial_series_instance_uid``
    is the series shown first (for example the SR, which then opens on its source image
    with the findings drawn). Both are OHIF's own query parameters.
    """
    query: dict[str, str] = {"StudyInstanceUIDs": study_instance_uid}
    if series_instance_uids:
        query["SeriesInstanceUIDs"] = ",".join(series_instance_uids)
    if initial_series_instance_uid:
        query["initialSeriesInstanceUID"] = initial_series_instance_uid
    return f"/viewer?{urlencode(query, safe=',')}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], site: OhifSite, upstream: str, config_js: bytes
    ) -> None:
        self.site = site
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise OhifError(f"the Orthanc URL must be http://host[:port][/path], got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_path = parts.path.rstrip("/")
        self.config_js = config_js
        super().__init__(address, partial(_Handler, directory=str(site.dist)))


class _Handler(SimpleHTTPRequestHandler):
    server: _Server
    # The base declares it an instance attribute; a class-level mapping is how it is meant
    # to be extended.
    extensions_map = {  # noqa: RUF012
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
        ".svg": "image/svg+xml",
        ".woff2": "font/woff2",
    }

    # -- routing ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy(head=head)
        elif path == "/app-config.js":
            self._send_bytes(self.server.config_js, "text/javascript", head=head, cache="no-store")
        elif self._is_file(path) or "." in path.rsplit("/", 1)[-1]:
            # Files of the site; a missing one with an extension is a real 404 (a stale
            # chunk name), not a route of the application.
            super().do_HEAD() if head else super().do_GET()
        else:
            index = (self.server.site.dist / "index.html").read_bytes()
            self._send_bytes(index, "text/html; charset=utf-8", head=head, cache="no-cache")

    def _is_file(self, path: str) -> bool:
        return Path(self.translate_path(path)).is_file()

    def _send_bytes(self, body: bytes, content_type: str, *, head: bool, cache: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    # -- reverse proxy to Orthanc's DICOMweb ----------------------------------------------

    def _proxy(self, *, head: bool) -> None:
        target = self.server.upstream_path + self.path
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARD_REQUEST}
        conn = http.client.HTTPConnection(
            self.server.upstream_host, self.server.upstream_port, timeout=120
        )
        try:
            conn.request("HEAD" if head else "GET", target, headers=headers)
            upstream = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            log.warning("ohif.proxy_failed", path=urlsplit(self.path).path, error=str(exc))
            self.send_error(HTTPStatus.BAD_GATEWAY, f"Orthanc did not answer: {exc}")
            return
        try:
            self.send_response(upstream.status, upstream.reason)
            for name, value in upstream.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            # HTTP/1.0 framing: without a Content-Length the body ends when we close.
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                shutil.copyfileobj(upstream, self.wfile, _CHUNK)
        except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
            # The browser went away (a cancelled prefetch) or Orthanc broke off.
            log.debug("ohif.proxy_aborted", path=urlsplit(self.path).path, error=str(exc))
            self.close_connection = True
        finally:
            conn.close()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Hundreds of requests per study: only failures are worth a line.
        status = int(code) if isinstance(code, int) or str(code).isdigit() else 0
        if status >= 400:
            log.debug("ohif.http", path=urlsplit(self.path).path, status=status)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ohif.http", message=format % args)


class OhifServer:
    """OHIF's static site plus a DICOMweb proxy to one Orthanc, served from a thread.

    >>> with OhifServer("http://127.0.0.1:8042") as viewer:   # doctest: +SKIP
    ...     url = viewer.viewer_url(study_uid)
    """

    def __init__(
        self,
        orthanc_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        site: OhifSite | None = None,
    ) -> None:
        self.orthanc_url = orthanc_url.rstrip("/")
        self.host = host
        self.port = port
        self.site = site or OhifSite.at()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The viewer's root URL (valid once started)."""
        if self._server is None:
            raise OhifError("the OHIF server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def viewer_url(
        self,
        study_instance_uid: str,
        series_instance_uids: list[str] | None = None,
        *,
        initial_series_instance_uid: str | None = None,
    ) -> str:
        """The URL that opens one study (see :func:`viewer_path`)."""
        return self.url + viewer_path(
            study_instance_uid,
            series_instance_uids,
            initial_series_instance_uid=initial_series_instance_uid,
        )

    def start(self) -> str:
        """Start serving; returns the viewer's root URL. Raises OhifError when OHIF is absent."""
        if self._server is not None:
            return self.url
        problem = self.site.missing
        if problem is not None:
            raise OhifError(problem)
        try:
            self._server = _Server(
                (self.host, self.port), self.site, self.orthanc_url, self.site.config.read_bytes()
            )
        except OSError as exc:
            raise OhifError(f"cannot serve OHIF on {self.host}:{self.port}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="ohif-http",
            daemon=True,
        )
        self._thread.start()
        log.info("ohif.started", url=self.url, orthanc=self.orthanc_url, version=OHIF_VERSION)
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        log.info("ohif.stopped")
        self._server = None
        self._thread = None

    def __enter__(self) -> OhifServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
