"""Every command in the README is run: the cheap ones here, the demo (`make run`) in
tests/demo, `make test` by CI itself; the Makefile targets it names exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support.net import port_open, wait_for


def _commands(readme: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    return [
        line.split("#")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_readme_commands_are_known_and_run(
    repo_root: Path, tmp_path: Path, make_node, sqlite_url: str
) -> None:
    commands = _commands((repo_root / "README.md").read_text())
    assert "make run" in commands and "make test" in commands
    dry = subprocess.run(
        ["make", "-n", "run", "test"], capture_output=True, text=True, cwd=repo_root, timeout=60
    )
    assert dry.returncode == 0 and "ddn-node demo" in dry.stdout and "pytest" in dry.stdout
    ci = (repo_root / ".ci" / "run").read_text()
    assert "make test" in ci
    node = make_node(sqlite_url)
    for command in commands:
        if command.startswith("make "):
            continue  # run by tests/demo (make run) and by CI (make test)
        args = command.split()
        assert args[0] == ".venv/bin/ddn-node", command
        args = [sys.executable, "-m", "ddn_node", *args[1:]]
        if args[3] == "serve":
            # Serve for real with the README's flags, on this test's ports and database.
            args = (
                [*args, "--config", str(node.config_path)]
                if "--config" not in args
                else [
                    a if a != "deploy/ddn-node.example.toml" else str(node.config_path)
                    for a in args
                ]
            )
            proc = subprocess.Popen(
                args, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                if "--role" not in args or "scp" in args:
                    wait_for(lambda: port_open(node.port), 60, f"{command}")
                else:
                    wait_for(lambda p=proc: p.poll() is None, 5, command)
            finally:
                proc.terminate()
                assert proc.wait(60) == 0, command
            continue
        if args[3] == "send":
            with node:
                target = args.index("--to") + 1
                args[target] = f"127.0.0.1:{node.port}"
                result = subprocess.run(
                    args, capture_output=True, text=True, cwd=repo_root, timeout=120
                )
            assert result.returncode == 0, (command, result.stderr)
            continue
        result = subprocess.run(args, capture_output=True, text=True, cwd=repo_root, timeout=120)
        assert result.returncode in (0, 2), (command, result.stderr)
        if "config check" in command:
            # The example config names the bundled model; with it in place the check passes.
            bundled = (repo_root / "models" / "ddn-cxr" / "manifest.json").is_file()
            assert (result.returncode == 0) == bundled, result.stderr
