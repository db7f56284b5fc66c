"""HTTPS served by the node itself (``[web] tls_cert`` / ``tls_key``), for real: uvicorn on a
loopback port with a throw-away CA made by openssl, an httpx client trusting only that CA.
On HTTPS the session cookie is ``Secure`` and responses carry Strict-Transport-Security;
on plain HTTP neither; behind a TLS-terminating proxy (``behind_https_proxy``) both."""

from __future__ import annotations

import re
import socket
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.net import free_port
from support.peers.tls import Pki, make_pki, openssl_available
from web_helpers import PASSWORD, USER, ClientFactory, login, web_settings

from ddn_node.dicom.spool import Spool
from ddn_node.store.engine import Database
from ddn_node.web.server import start_web

pytestmark = pytest.mark.skipif(not openssl_available(), reason="openssl not installed")

HSTS = "max-age=31536000"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def trusting(ca: Path, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    for name, version in versions.items():
        setattr(context, name, version)
    return context


@pytest.fixture
def https_node(pki: Pki, sqlite_database: Database, spool: Spool, tmp_path: Path) -> Iterator[str]:
    settings = web_settings(
        tmp_path,
        "sqlite://",
        host="127.0.0.1",
        port=free_port(),
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
    )
    stop = start_web(settings, sqlite_database, spool)
    try:
        yield f"https://127.0.0.1:{settings.web.port}"
    finally:
        stop()


def test_https_login_gets_a_secure_cookie_and_hsts(https_node: str, pki: Pki) -> None:
    with httpx.Client(base_url=https_node, verify=trusting(pki.ca_cert)) as client:
        done = login(client)
        assert done.status_code == 303
        session_cookie = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith("ddn_session=")
        )
        assert "Secure" in session_cookie and "HttpOnly" in session_cookie
        assert done.headers["strict-transport-security"] == HSTS
        page = client.get("/")  # the Secure cookie goes back over HTTPS
        assert page.status_code == 200 and "Log out" in page.text
        assert page.headers["strict-transport-security"] == HSTS
        assert client.get("/healthz").headers["strict-transport-security"] == HSTS
        # Also on the answers given before routing (refusals).
        assert client.get("/api/worklist").headers["strict-transport-security"] == HSTS

    # TLS 1.2 is accepted (with an AEAD suite), older is not.
    tls12 = trusting(pki.ca_cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    with httpx.Client(base_url=https_node, verify=tls12) as client:
        assert client.get("/healthz").status_code == 200
    with pytest.raises(httpx.ConnectError):
        # A client that trusts another CA (a stranger's certificate, or an attacker's).
        httpx.get(https_node + "/healthz", verify=trusting(pki.other_ca_cert))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 / 1.1: the point here
        tls11 = trusting(
            pki.ca_cert,
            minimum_version=ssl.TLSVersion.TLSv1,
            maximum_version=ssl.TLSVersion.TLSv1_1,
        )
    tls11.set_ciphers("ALL:@SECLEVEL=0")  # so that the refusal is the server's
    with pytest.raises(httpx.ConnectError):
        httpx.get(https_node + "/healthz", verify=tls11)
    # Plain HTTP to the HTTPS port gets no page.
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(https_node.replace("https://", "http://") + "/healthz", timeout=5)
        r.raise_for_status()


def test_tls12_suites_are_forward_secret_aead(https_node: str, pki: Pki) -> None:
    host, port = https_node.removeprefix("https://").split(":")
    context = trusting(pki.ca_cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        name, version, _bits = tls.cipher()  # type: ignore[misc]
    assert (
        version == "TLSv1.2" and name.startswith("ECDHE-") and ("GCM" in name or "CHACHA" in name)
    )
    cbc_only = trusting(pki.ca_cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc_only.set_ciphers("ECDHE-RSA-AES128-SHA:AES128-SHA")
    with pytest.raises(httpx.ConnectError):
        httpx.get(https_node + "/healthz", verify=cbc_only)


def test_plain_http_has_neither(sqlite_database: Database, spool: Spool, tmp_path: Path) -> None:
    settings = web_settings(tmp_path, "sqlite://", host="127.0.0.1", port=free_port())
    stop = start_web(settings, sqlite_database, spool)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.web.port}") as client:
            done = login(client)
            assert done.status_code == 303
            session_cookie = next(
                c for c in done.headers.get_list("set-cookie") if c.startswith("ddn_session=")
            )
            assert "secure" not in session_cookie.lower()
            assert "strict-transport-security" not in done.headers
            assert "strict-transport-security" not in client.get("/").headers
    finally:
        stop()


def test_behind_an_https_proxy_cookies_are_secure_and_hsts_is_sent(
    sqlite_database: Database, make_client: ClientFactory
) -> None:
    # The proxy speaks plain HTTP to the node; the browser sees HTTPS and so sends back
    # Secure cookies, which this client does by hand (its own jar would not over http).
    client = make_client(sqlite_database, behind_https_proxy=True)
    form = client.get("/login")
    assert form.headers["strict-transport-security"] == HSTS
    (login_cookie,) = form.headers.get_list("set-cookie")
    assert "Secure" in login_cookie
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    done = client.post(
        "/login",
        data={"username": USER, "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
        headers={"cookie": login_cookie.split(";")[0]},
    )
    assert done.status_code == 303
    session_cookie = next(
        c for c in done.headers.get_list("set-cookie") if c.startswith("ddn_session=")
    )
    assert "Secure" in session_cookie
    assert done.headers["strict-transport-security"] == HSTS
    page = client.get("/", headers={"cookie": session_cookie.split(";")[0]})
    assert page.status_code == 200 and page.headers["strict-transport-security"] == HSTS


def test_tls_settings_go_together(tmp_path: Path) -> None:
    from ddn_node.config import Settings

    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Settings.model_validate({"web": {"tls_cert": str(tmp_path / "c.pem")}})
