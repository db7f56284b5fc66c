"""`ddn-node config check` names the file and the key of every problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddn_node.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def run_check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "ddn_node", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_example_config_is_valid_and_documents_every_section() -> None:
    settings = load_settings(REPO / "deploy" / "ddn-node.example.toml")
    text = (REPO / "deploy" / "ddn-node.example.toml").read_text()
    for section in type(settings).model_fields:
        assert section in text, f"example config does not mention [{section}]"


def test_problems_name_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nport = 70000\nae_titel = "X"\n'
        '[node.tls]\nenabled = true\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n'
        '[[peers]]\nae_title = "PACS"\nhosts = ["not-an-ip"]\n'
    )
    result = run_check(bad)
    assert result.returncode == 2
    err = result.stderr
    assert f"{bad}: node.port: Input should be less than or equal to 65535 (got 70000)" in err
    assert f"{bad}: node.ae_titel: unknown key" in err
    assert f"{bad}: peers[0].hosts" in err and "not-an-ip" in err


def test_unreadable_paths_are_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "paths.toml"
    cfg.write_text(
        f'[node]\nspool_dir = "{tmp_path}/spool"\n'
        '[node.tls]\nenabled = true\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n'
        f'[database]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n'
    )
    result = run_check(cfg)
    assert result.returncode == 2
    assert f"{cfg}: node.tls.cert: path '/nonexistent/cert.pem' does not exist" in result.stderr
    assert f"{cfg}: node.tls.key: path '/nonexistent/key.pem' does not exist" in result.stderr


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\nport = 1\n")
    result = run_check(broken)
    assert result.returncode == 2 and f"{broken}: (syntax)" in result.stderr
    result = run_check(tmp_path / "absent.toml")
    assert result.returncode == 2 and "file not found" in result.stderr


def test_environment_overrides_and_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text("[node]\nport = 11112\n")
    settings = load_settings(
        cfg, {"DDN_NODE__PORT": "11113", "DDN_WEB__ENABLED": "false", "DDN_DATA": "/x"}
    )
    assert settings.node.port == 11113 and settings.web.enabled is False
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, {"DDN_NODE__PORT": "0"})
    assert str(info.value).startswith("DDN_NODE__PORT: node.port:")


def test_quiet_period_per_calling_ae() -> None:
    from ddn_node.config import PeerSettings

    settings = load_settings(None, {})
    fast = settings.model_copy(update={"peers": [PeerSettings(ae_title="CT1", quiet_period_s=3)]})
    assert fast.quiet_period_for("CT1") == 3
    assert fast.quiet_period_for("CT2") == settings.completion.quiet_period_s
