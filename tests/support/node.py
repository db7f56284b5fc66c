"""Running the real node as a subprocess, the way an administrator does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from support.net import GiveUp, free_port, port_open, wait_for

REPO = Path(__file__).resolve().parents[2]
DDN_NODE = [sys.executable, "-m", "ddn_node"]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(tmp: Path, db_url: str, port: int | None = None) -> dict[str, Any]:
    return {
        "node": {
            "ae_title": "DDN_NODE",
            "host": "127.0.0.1",
            "port": port or free_port(),
            "spool_dir": str(tmp / "spool"),
            "disk_reserve_mb": 1,
            "acse_timeout_s": 10,
            "dimse_timeout_s": 30,
            "network_timeout_s": 30,
        },
        "peers": [
            {"ae_title": ae, "hosts": ["127.0.0.1"]}
            for ae in ("STORESCU", "ECHOSCU", "DDN_SEND", "ORTHANC", "TESTSCU")
        ],
        "database": {"url": db_url},
        "completion": {"quiet_period_s": 2, "force_complete_s": 120, "sweep_interval_s": 0.5},
        "worker": {"poll_interval_s": 0.2},
        "delivery": {
            "sweep_interval_s": 0.5,
            "backoff_initial_s": 0.5,
            "backoff_max_s": 2,
            "timeout_s": 10,
        },
        "web": {"enabled": False, "port": free_port()},
        "logging": {"level": "INFO", "json": True},
    }


@dataclass
class NodeProcess:
    """A ``ddn-node serve`` subprocess with its own config, spool, database and log."""

    tmp: Path
    config: dict[str, Any]
    roles: tuple[str, ...] = ("scp",)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    config_path: Path = field(init=False)
    starts: int = 0
    # A command the node runs under (say strace): its arguments, before the node's own.
    wrapper: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.config_path = self.tmp / "ddn-node.toml"
        self.log_path = self.tmp / "node.log"
        self.config_path.write_text(tomli_w.dumps(self.config))

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def spool(self) -> Path:
        return Path(self.config["node"]["spool_dir"])

    @property
    def db_url(self) -> str:
        return str(self.config["database"]["url"])

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run another ddn-node command against this node's config."""
        return subprocess.run(
            [*DDN_NODE, *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )

    def start(self, timeout: float = 60) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.starts == 0 and self.db_url.startswith("postgresql"):
            upgraded = self.cli("db", "upgrade")
            assert upgraded.returncode == 0, upgraded.stderr
        args = [*self.wrapper, *DDN_NODE, "serve", "--config", str(self.config_path)]
        for role in self.roles:
            args += ["--role", role]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        log.close()
        self.starts += 1
        wanted = self.starts

        def started() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise GiveUp(
                    f"node exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            return sum(1 for e in self.events() if e.get("event") == "serve.started") >= wanted

        wait_for(started, timeout, "node start")
        if "scp" in self.roles:
            wait_for(lambda: port_open(self.port), 10, "SCP port")
        return self

    def events(self) -> Iterator[dict[str, Any]]:
        if not self.log_path.exists():
            return iter(())
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return iter(out)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stop()
