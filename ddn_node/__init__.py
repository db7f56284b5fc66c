"""ddn-node: an AI triage node for radiology (a DICOM Application Entity)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddn-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
