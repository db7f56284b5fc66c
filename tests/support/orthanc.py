"""A real Orthanc 1.10 on loopback as the PACS in end-to-end tests (the demo's runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddn_node.demo.orthanc import LocalOrthanc, orthanc_available
from support.net import free_port

__all__ = ["Orthanc", "orthanc_available"]


class Orthanc(LocalOrthanc):
    def __init__(
        self,
        home: Path,
        node_port: int,
        node_aet: str = "DDN_NODE",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            home=home,
            http_port=free_port(),
            dicom_port=free_port(),
            node_port=node_port,
            node_aet=node_aet,
            extra_config=dict(extra_config or {}),
        )

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
