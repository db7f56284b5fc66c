"""The reverse-proxy recipe of docs/integration.md, as documented: its nginx server block
(Debian's nginx) in front of the node's web part configured with the recipe's [web]
snippet. Only what a site must change is changed: the certificate paths, and ports free on
this machine. Through the proxy, a login gets a Secure cookie, every answer carries HSTS,
the forms' same-origin check passes, and the audit trail names the client, not the proxy."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from support.net import free_port, port_open, wait_for
from support.peers.tls import Pki, make_pki, openssl_available
from web_helpers import csrf_of, login, web_settings

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent
from ddn_node.web.server import start_web

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    not (NGINX and openssl_available()), reason="nginx or openssl not installed"
)


def _recipe(repo_root: Path) -> tuple[str, dict[str, object]]:
    """The documented nginx server block and the [web] settings that go with it."""
    doc = (repo_root / "docs" / "integration.md").read_text()
    (nginx,) = [b for b in re.findall(r"```nginx\n(.*?)```", doc, re.S) if "proxy_pass" in b]
    (web,) = [
        tomllib.loads(b)["web"]
        for b in re.findall(r"```toml\n(.*?)```", doc, re.S)
        if "behind_https_proxy" in b
    ]
    return nginx, web


@pytest.fixture
def proxied(
    repo_root: Path, tmp_path: Path, sqlite_database: Database, spool: Spool
) -> Iterator[tuple[str, Pki]]:
    nginx_block, web = _recipe(repo_root)
    pki = make_pki(tmp_path / "pki")
    https_port, web_port = free_port(), free_port()
    documented_port = web["port"]
    server = (
        nginx_block.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
        .replace("/etc/nginx/tls/worklist.crt", str(pki.server.cert))
        .replace("/etc/nginx/tls/worklist.key", str(pki.server.key))
        .replace(f"127.0.0.1:{documented_port}", f"127.0.0.1:{web_port}")
    )
    assert f"127.0.0.1:{web_port}" in server and str(https_port) in server
    run = tmp_path / "nginx"
    run.mkdir()
    (run / "server.conf").write_text(server)
    (run / "nginx.conf").write_text(
        f"daemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\n"
        "events {}\nhttp {\n    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {run}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {run}/server.conf;\n}}\n"
    )
    settings = web_settings(tmp_path, "sqlite://", **{**web, "port": web_port})
    stop = start_web(settings, sqlite_database, spool)
    assert NGINX is not None
    proxy = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf")])
    try:
        wait_for(lambda: port_open(https_port), 30, "nginx listening")
        yield f"https://localhost:{https_port}", pki
    finally:
        proxy.terminate()
        proxy.wait(30)
        stop()


def test_documented_proxy_recipe_keeps_cookies_secure_and_names_the_client(
    proxied: tuple[str, Pki], sqlite_database: Database
) -> None:
    base, pki = proxied
    trust = ssl.create_default_context(cafile=str(pki.ca_cert))
    with httpx.Client(base_url=base, verify=trust, timeout=30) as client:
        done = login(client)
        assert done.status_code == 303, done.text
        cookie = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith("ddn_session=")
        )
        assert "Secure" in cookie and "HttpOnly" in cookie
        page = client.get("/")
        assert page.status_code == 200 and "Log out" in page.text
        assert page.headers["strict-transport-security"] == "max-age=31536000"
        # A form post through the proxy passes the same-origin check (Host forwarded).
        out = client.post("/logout", data={"csrf_token": csrf_of(page.text)})
        assert out.status_code == 303
    with sqlite_database.read() as s:
        logins = s.scalars(select(AuditEvent).where(AuditEvent.event == "user.login")).all()
    assert [e.host for e in logins] == ["127.0.0.1"]  # the client, from X-Forwarded-For
