"""No silent defaults (issue 15): the example's demo login and token, a password equal to
its user name and a missing or short session key are refused outside a demo, by `config
check` and by `serve`; in a demo (``demo = true``) they work, and every page and every log
line says so."""

from __future__ import annotations

import hashlib
import re
import secrets
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w
from support.net import free_port, port_open
from support.node import DDN_NODE, REPO
from web_helpers import FAST_HASHER, login

from ddn_node.config import Settings, insecure_settings

EXAMPLE = REPO / "deploy" / "ddn-node.example.toml"
DEMO_TOKEN_SHA = hashlib.sha256(b"demo-token").hexdigest()


def _check(path: Path) -> tuple[int, str]:
    import subprocess

    done = subprocess.run(
        [*DDN_NODE, "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def _example(tmp_path: Path, **changes: object) -> Path:
    """The example configuration as shipped, with the paths it writes moved to tmp."""
    data = tomllib.loads(EXAMPLE.read_text())
    data["node"]["spool_dir"] = str(tmp_path / "spool")
    data["database"]["url"] = f"sqlite:///{tmp_path / 'db.sqlite'}"
    data.update(changes)
    path = tmp_path / "ddn-node.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_example_config_is_a_demo_and_config_check_names_each_guessable_credential(
    tmp_path: Path,
) -> None:
    code, out = _check(EXAMPLE)
    assert code == 0, out
    assert "DEMO with 3 guessable credential(s)" in out
    for key in ("web.secret_key", "web.users[0].password_hash", "web.tokens[0].sha256"):
        assert f"demo {EXAMPLE}: {key}:" in out

    code, out = _check(_example(tmp_path, demo=False))
    assert code == 2, out
    assert out.count("error ") == 3
    assert "user 'radiologist' has a guessable password" in out
    assert "token 'demo' is a guessable one" in out
    assert "web.secret_key: empty" in out


def test_serve_refuses_insecure_settings_outside_a_demo(tmp_path: Path) -> None:
    import subprocess

    config = _example(tmp_path, demo=False)
    data = tomllib.loads(config.read_text())
    data["node"]["host"], data["node"]["port"] = "127.0.0.1", free_port()
    data["web"]["port"] = free_port()
    data["web"]["secret_key"] = secrets.token_urlsafe(32)  # only the login and token left
    config.write_text(tomli_w.dumps(data))
    done = subprocess.run(
        [*DDN_NODE, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "web.users[0].password_hash" in done.stderr and "web.tokens[0].sha256" in done.stderr
    assert "web.secret_key" not in done.stderr
    assert not port_open(data["node"]["port"]) and not port_open(data["web"]["port"])


@pytest.mark.parametrize(
    ("web", "keys"),
    [
        ({"secret_key": "short"}, ["web.secret_key"]),
        ({"secret_key": "a" * 40}, ["web.secret_key"]),  # long, but hardly random
        (
            {"users": [{"name": "smith", "password_hash": FAST_HASHER.hash("smith")}]},
            ["web.users[0].password_hash"],
        ),
        ({"tokens": [{"name": "ris", "sha256": DEMO_TOKEN_SHA}]}, ["web.tokens[0].sha256"]),
        ({"users": [{"name": "smith", "password_hash": FAST_HASHER.hash("x7!Lq9#mZ2")}]}, []),
        ({"enabled": False, "tokens": [{"name": "ris", "sha256": DEMO_TOKEN_SHA}]}, []),
        ({"host": "0.0.0.0"}, ["web.host"]),  # a login in clear text on the network
        ({"host": "0.0.0.0", "behind_https_proxy": True}, []),
        ({"host": "::1"}, []),
    ],
)
def test_what_counts_as_insecure(web: dict[str, object], keys: list[str]) -> None:
    base: dict[str, object] = {
        "secret_key": secrets.token_urlsafe(32),
        "users": [{"name": "smith", "password_hash": FAST_HASHER.hash("x7!Lq9#mZ2")}],
    }
    settings = Settings.model_validate({"web": {**base, **web}})
    assert [p.key for p in insecure_settings(settings)] == keys


def test_a_demo_says_so_on_every_page_and_in_every_log_line(make_node, sqlite_url: str) -> None:
    web_port = free_port()
    node = make_node(
        sqlite_url,
        roles=("scp", "web"),
        demo=True,
        web={
            "enabled": True,
            "port": web_port,
            "secret_key": secrets.token_urlsafe(32),
            "users": [{"name": "radiologist", "password_hash": FAST_HASHER.hash("radiologist")}],
            "tokens": [{"name": "demo", "sha256": DEMO_TOKEN_SHA}],
        },
    )
    with node, httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=30) as client:
        assert "Demo credentials are accepted" in client.get("/login").text
        login(client, "radiologist", "radiologist")  # the demo login works in a demo ...
        page = client.get("/")
        assert page.status_code == 200
        banner = re.search(r'<div class="demo-banner"[^>]*>(.*?)</div>', page.text, re.S)
        assert banner is not None
        assert "web.users[0].password_hash" in banner.group(1)
        assert "web.tokens[0].sha256" in banner.group(1)
        api = client.get("/api/worklist", headers={"Authorization": "Bearer demo-token"})
        assert api.status_code == 200  # ... and so does the demo token
    events = list(node.events())
    warned = [e for e in events if e.get("event") == "security.demo_credentials"]
    assert sorted(e["key"] for e in warned) == [
        "web.tokens[0].sha256",
        "web.users[0].password_hash",
    ]
    assert events and all(e.get("demo") is True for e in events)
