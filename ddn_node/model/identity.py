"""Who a model is, without loading it: its Device UID, from the hash of its weights.

Torch-free, so the DICOM listener can tell the node's own results from others by the
Device UID their Contributing Equipment carries (dicom/origin.py) without importing the
network.
"""

from __future__ import annotations

import json
from pathlib import Path


def device_uid_from_sha256(sha256_hex: str) -> str:
    """A UID under the 2.25 root (PS3.5 B.2: UUID-derived) from the weights' hash.

    Same weights -> same UID; any change of weights -> a new UID, as TID 4019 expects of a
    Device Observer UID.
    """
    return "2.25." + str(int(sha256_hex[:32], 16))


def manifest_device_uid(artifact: Path) -> str | None:
    """The Device UID of the artifact in ``artifact`` (a folder with manifest.json), or
    None when its manifest cannot be read."""
    try:
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        return device_uid_from_sha256(str(manifest["weights"]["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def manifest_name(artifact: Path) -> tuple[str, str, bool]:
    """(name, version, is_demo) from the manifest in ``artifact``, without torch, for the
    pages and commands that only say which model is where; ValueError when unreadable."""
    try:
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        return str(manifest["name"]), str(manifest["version"]), bool(manifest.get("is_demo", True))
    except OSError as exc:
        raise ValueError(f"cannot read {artifact / 'manifest.json'}: {exc.strerror}") from exc
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{artifact / 'manifest.json'} is not a model manifest") from exc
