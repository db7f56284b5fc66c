"""What "survives hostile input" means for each parser of the node, as assertions.

Every parser either returns a sane result or raises the typed error its module documents:

- ``headers.read_header``: a :class:`Header` (text values are ``str``, integers ``int`` or
  ``None``) or :class:`HeaderError` (whose ``status`` is a C-STORE failure status);
- ``pixels.load_display_image``: float32 HxW, finite, in [0, 1], or a ``PixelDataError``;
- ``results.read_sr``: an ``SRContent`` or ``ValueError`` (on any data set pydicom reads);
- ``scu._scan``: never raises; an unreadable file is reported in its "bad" list.

Nothing may hang: each call runs under a SIGALRM deadline (the tests run in the main
thread), so a parser stuck in a Python loop fails the test instead of stalling CI; a stall
inside C code is caught by pytest-timeout.
"""

from __future__ import annotations

import contextlib
import math
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
from support.sr_reader import read_sr

from ddn_node.dicom import scu
from ddn_node.dicom.headers import ClampedReader, Header, HeaderError, read_header
from ddn_node.dicom.pixels import PixelDataError, PixelLimits, load_display_image

T = TypeVar("T")

# Statuses the SCP documents (scp.py, docs/conformance-statement.md); 0xC211 ("exception
# in the handler", pynetdicom's own answer when our handler raises) is *not* among them.
STORE_STATUSES = {0x0000, 0xA700, 0xC000, 0xC001, 0xC002, 0xC003}
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.35",
}


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    def _alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _typed(
    call: Callable[[], T], allowed: tuple[type[BaseException], ...], what: str, seconds: float
) -> T | BaseException:
    """Run ``call``; return its result or the allowed exception it raised; fail on anything else."""
    try:
        with deadline(seconds, what), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()
    except Hang:
        raise
    except allowed as exc:
        return exc
    except Exception as exc:  # this is precisely what the test looks for
        raise AssertionError(f"{what} raised {type(exc).__name__}: {str(exc)[:300]}") from exc


def check_header(path: Path, seconds: float = 10) -> str:
    out = _typed(lambda: read_header(path), (HeaderError,), "read_header", seconds)
    if isinstance(out, HeaderError):
        assert 0xC000 <= out.status <= 0xCFFF, f"HeaderError status 0x{out.status:04X}"
        return "HeaderError"
    assert isinstance(out, Header)
    for key in out.values:
        if key.startswith("_"):
            continue
        text = out.text(key)
        assert isinstance(text, str)
    for key in ("Rows", "Columns"):
        value = out.integer(key)
        assert value is None or isinstance(value, int)
    return "header"


def check_pixels(path: Path, limits: PixelLimits | None = None, seconds: float = 30) -> str:
    out = _typed(
        lambda: load_display_image(path, limits=limits),
        (PixelDataError,),
        "load_display_image",
        seconds,
    )
    if isinstance(out, PixelDataError):
        return type(out).__name__
    assert isinstance(out, np.ndarray), type(out)
    assert out.dtype == np.float32 and out.ndim == 2, (out.dtype, out.shape)
    assert np.isfinite(out).all(), "NaN or infinity in the display image"
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    return "image"


def check_sr(path: Path, seconds: float = 10) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Clamped: the test's own read must not be the one that allocates gigabytes.
            with ClampedReader(path) as handle:
                ds = pydicom.dcmread(handle, force=True)
            sop_class = str(ds.get("SOPClassUID", ""))
    except Exception:  # noqa: BLE001 - pydicom's own failure is not read_sr's; counted, not judged
        return "unreadable"
    if sop_class not in SR_CLASSES and "ContentSequence" not in ds:
        return "not SR"
    out = _typed(lambda: read_sr(ds), (ValueError,), "read_sr", seconds)
    if isinstance(out, ValueError):
        return "ValueError"
    assert out.abnormality_score is None or math.isfinite(out.abnormality_score)
    for finding in out.findings.values():
        assert math.isfinite(finding.probability), (
            f"{finding.label}: probability {finding.probability}"
        )
    return "sr"


def check_scan(path: Path, seconds: float = 10) -> str:
    out = _typed(lambda: scu._scan([path]), (), "scu._scan", seconds)
    assert not isinstance(out, BaseException)
    items, bad = out
    assert len(items) + len(bad) == 1
    return "sendable" if items else "refused"


def check_node_parsers(path: Path, limits: PixelLimits | None = None) -> dict[str, str]:
    """The parsers that hostile bytes reach inside the node: the SCP's header reader and
    the worker's (and web UI's) pixel decoder."""
    return {"header": check_header(path), "pixels": check_pixels(path, limits)}


def check_all(path: Path, limits: PixelLimits | None = None) -> dict[str, str]:
    return {**check_node_parsers(path, limits), "sr": check_sr(path), "scan": check_scan(path)}
