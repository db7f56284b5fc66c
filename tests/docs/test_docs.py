"""The documents stay true: every log event the code emits is documented, the deployment
files parse, and the README's commands exist."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from ddn_node.config import Settings, load_settings

LEVELS = {"info", "warning", "error", "exception", "debug", "critical"}


def _events(package: Path) -> set[str]:
    events = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"log", "logger"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+", node.args[0].value)
            ):
                events.add(node.args[0].value)
    return events


def test_every_log_event_is_documented(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "operations.md").read_text()
    families = set(re.findall(r"`([a-z]+)\.\*`", doc))
    missing = sorted(
        e
        for e in _events(repo_root / "ddn_node")
        if f"`{e}`" not in doc and e.split(".")[0] not in families
    )
    assert missing == [], f"document these events in docs/operations.md: {missing}"


def test_deployment_files_parse(repo_root: Path) -> None:
    load_settings(repo_root / "deploy" / "compose-node.toml")
    snippet = json.loads((repo_root / "deploy" / "orthanc" / "orthanc-ddn-node.json").read_text())
    assert snippet["DicomModalities"]["ddn-node"]["AET"] == "DDN_NODE"
    unit = (repo_root / "deploy" / "ddn-node.service").read_text()
    for line in (
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/ddn-node",
        "User=ddn-node",
        "Restart=on-failure",
    ):
        assert line in unit
    if shutil.which("systemd-analyze"):
        result = subprocess.run(
            ["systemd-analyze", "verify", str(repo_root / "deploy" / "ddn-node.service")],
            capture_output=True,
            text=True,
        )
        assert "Unknown key" not in result.stderr


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker client not installed")
def test_compose_file_is_valid(repo_root: Path) -> None:
    result = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(repo_root / "deploy" / "compose.yaml"),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "is not a docker command" in result.stderr or "unknown shorthand flag" in result.stderr:
        pytest.skip("docker compose plugin not installed")
    assert result.returncode == 0, result.stderr


def test_readme_links_resolve(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (repo_root / target).exists(), f"README links to missing {target}"


def test_pyproject_pins_torch_in_range(repo_root: Path) -> None:
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_every_toml_snippet_in_the_docs_is_valid_configuration(repo_root: Path) -> None:
    """An administrator pastes these into ddn-node.toml: each must be accepted as it is
    (unknown keys are refused, so a renamed setting would fail here)."""
    blocks = [
        (path.name, block)
        for path in [*sorted((repo_root / "docs").glob("*.md")), repo_root / "README.md"]
        for block in re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)
    ]
    assert blocks, "no TOML snippets found"
    for name, block in blocks:
        try:
            Settings.model_validate(tomllib.loads(block))
        except ValueError as exc:
            pytest.fail(f"a TOML snippet of {name} is not valid configuration: {exc}")
