"""A local Orthanc (the Debian package) as a PACS for the demo and the tests.

Started with a generated configuration: loopback only, its own storage folder, the node
registered as modality ``ddn`` so that Orthanc's REST API can push studies to it and the
node can send results back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import httpx

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# The Debian orthanc-dicomweb package; loaded when installed, so that viewers (OHIF) can
# read the studies over DICOMweb at <url>/dicom-web/.
DICOMWEB_PLUGIN = Path("/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")
DICOMWEB_ROOT = "/dicom-web/"


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).exists()


class OrthancError(RuntimeError):
    pass


@dataclass
class LocalOrthanc:
    home: Path
    http_port: int
    dicom_port: int
    node_port: int
    node_aet: str = "DDN_NODE"
    aet: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None
    # Merged over the generated configuration, as an administrator merges a snippet
    # (deploy/orthanc/orthanc-ddn-node.json) into orthanc.json: top-level keys replace,
    # DicomModalities entries are added.
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str | None:
        """The DICOMweb root (QIDO-RS, WADO-RS), or None without the plugin."""
        return f"{self.url}{DICOMWEB_ROOT.rstrip('/')}" if DICOMWEB_PLUGIN.is_file() else None

    @property
    def explorer_url(self) -> str:
        return f"{self.url}/app/explorer.html"

    def write_config(self) -> Path:
        storage = self.home / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ddn-demo-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "DicomScuTimeout": 30,
            "Plugins": [],
            "DicomModalities": {"ddn": [self.node_aet, "127.0.0.1", self.node_port]},
            "SaveJobs": False,
        }
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            # Full metadata: read from the files, so every attribute a viewer needs (SR
            # content, functional groups of multi-frame objects) is in /metadata.
            config["DicomWeb"] = {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "EnableWado": False,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        for key, value in self.extra_config.items():
            if key == "DicomModalities":
                config[key] = {**cast("dict[str, Any]", config[key]), **value}
            elif not key.startswith("//"):
                config[key] = value
        path = self.home / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout_s: float = 60) -> LocalOrthanc:
        config = self.write_config()
        log = open(self.home / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.home / 'orthanc.log'}"
                )
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- REST ---------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def upload(self, path: Path) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=60)
        r.raise_for_status()
        return dict(r.json())

    def send_to_node(self, resources: list[str], modality: str = "ddn") -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/modalities/{modality}/store",
            json={"Resources": resources, "Synchronous": True},
            timeout=300,
        )
        r.raise_for_status()
        return dict(r.json())

    def find_study(self, study_uid: str) -> str | None:
        r = httpx.post(f"{self.url}/tools/lookup", content=study_uid, timeout=30)
        r.raise_for_status()
        return next((str(h["ID"]) for h in r.json() if h["Type"] == "Study"), None)

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{orthanc_study_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        r = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def study_modalities(self, study_uid: str) -> list[str]:
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        return [
            s["MainDicomTags"].get("Modality", "") for s in self.get(f"/studies/{study_id}/series")
        ]

    def instance_datasets(self, study_uid: str) -> list[Any]:
        import pydicom

        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        return [
            pydicom.dcmread(BytesIO(self.instance_file(i["ID"])))
            for i in self.study_instances(study_id)
        ]
