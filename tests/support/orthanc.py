"""A real Orthanc 1.10 (Debian package) on loopback, as the PACS in end-to-end tests."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support.net import free_port, wait_for

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).exists()


@dataclass
class Orthanc:
    tmp: Path
    node_port: int
    node_aet: str = "DDN_NODE"
    aet: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        storage = self.tmp / "orthanc-db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ddn-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "DicomScuTimeout": 30,
            "Plugins": [],
            "DicomModalities": {"ddn": [self.node_aet, "127.0.0.1", self.node_port]},
            "StableAge": 1,
            "SaveJobs": False,
        }
        path = self.tmp / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60) -> Orthanc:
        config = self.write_config()
        log = open(self.tmp / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC_BIN, str(config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: httpx.get(f"{self.url}/system", timeout=1).status_code == 200, timeout, "Orthanc start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- REST helpers ---------------------------------------------------------------

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def upload(self, path: Path) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=60)
        r.raise_for_status()
        return r.json()

    def send_to_node(self, resources: list[str], modality: str = "ddn") -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/modalities/{modality}/store", json={"Resources": resources, "Synchronous": True}, timeout=120
        )
        r.raise_for_status()
        return r.json()

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{orthanc_study_id}/instances"))

    def find_study(self, study_uid: str) -> str | None:
        r = httpx.post(f"{self.url}/tools/lookup", content=study_uid, timeout=30)
        r.raise_for_status()
        for hit in r.json():
            if hit["Type"] == "Study":
                return str(hit["ID"])
        return None

    def instance_file(self, instance_id: str) -> bytes:
        r = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
