"""Fuzzing the node's DICOM parsers in-process with hypothesis.

Mutated seeds (bit flips, truncation, wrong / huge lengths, wrong VRs, undefined-length
sequences never closed, inserted elements, broken File Meta) and decompression bombs
(declared Rows x Columns x frames far beyond the data) go to read_header,
load_display_image, read_sr and the SCU's scan; every call ends with a result or the
typed error of its module (hostile_oracle), within a deadline, and within a memory
budget (tracemalloc: what Python and numpy allocate).

CI runs a few hundred deterministic cases (derandomize); ``make soak`` runs 10,000+ fresh
ones. Each variant prints its case count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from hostile_gen import bombs, mutated_files, seed, unclosed_sequences
from hostile_oracle import check_header, check_node_parsers, check_pixels, check_scan, check_sr
from hypothesis import HealthCheck, Phase, given, settings

from ddn_node.dicom.pixels import PixelLimits

HERE = Path(__file__).resolve().parent

# The fuzz images are tiny (16x16 to 64x64 seeds); a few megapixels is far more than any
# legitimate case needs, and lets a bomb that slips past the guards show as memory, not
# as an out-of-memory kill of the test run.
FUZZ_LIMITS = PixelLimits(max_megapixels=4, max_decoded_mb=32)
# Peak Python + numpy allocation per case: 4 MP at float64 through a few pipeline stages.
FUZZ_PEAK_MB = 256

CI = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
SOAK = settings(CI, max_examples=12_000, derandomize=False)
BOMBS_CI = settings(CI, max_examples=100)
# For the parsers outside the node's receive path (known to fail, see below): report the
# first failure found, without spending minutes shrinking it.
KNOWN = settings(CI, max_examples=150, phases=[Phase.explicit, Phase.generate])


def _fuzz(tmp_path: Path, profile: settings, check: object = check_node_parsers) -> Counter[str]:
    counts: Counter[str] = Counter()
    path = tmp_path / "case.dcm"

    @profile
    @given(case=mutated_files())
    def run(case: tuple[str, object, bytes]) -> None:
        desc, _seed, data = case
        path.write_bytes(data)
        tracemalloc.reset_peak()
        try:
            outcome = check(path, FUZZ_LIMITS)  # type: ignore[operator]
        except AssertionError as exc:
            raise AssertionError(f"{desc}: {exc}") from exc
        _, peak = tracemalloc.get_traced_memory()
        assert peak < FUZZ_PEAK_MB * 2**20, f"{desc}: peak allocation {peak / 2**20:.0f} MiB"
        counts["cases"] += 1
        for parser, result in outcome.items():
            counts[f"{parser}:{result}"] += 1

    tracemalloc.start()
    try:
        run()
    finally:
        tracemalloc.stop()
    print(
        f"\nparser fuzz: {counts['cases']} cases; outcomes {json.dumps(dict(sorted(counts.items())))}"
    )
    return counts


def test_fuzz_node_parsers_ci(tmp_path: Path) -> None:
    """read_header and load_display_image: a few hundred deterministic cases."""
    counts = _fuzz(tmp_path, CI)
    assert counts["cases"] >= 300
    # The mutations must reach past the first checks: some cases still decode, some fail
    # in each typed way, or the fuzzer is only testing the front door.
    assert counts["pixels:image"] > 0 and counts["header:header"] > 0
    assert counts["header:HeaderError"] > 0 and counts["pixels:CorruptPixelData"] > 0


@pytest.mark.soak
def test_fuzz_node_parsers_soak(tmp_path: Path) -> None:
    counts = _fuzz(tmp_path, SOAK)
    assert counts["cases"] >= 10_000


def _sr_only(path: Path, _limits: PixelLimits) -> dict[str, str]:
    return {"sr": check_sr(path)}


def _scan_only(path: Path, _limits: PixelLimits) -> dict[str, str]:
    return {"scan": check_scan(path)}


def test_fuzz_read_sr(tmp_path: Path) -> None:
    _fuzz(tmp_path, KNOWN, _sr_only)


def test_fuzz_scu_scan(tmp_path: Path) -> None:
    _fuzz(tmp_path, KNOWN, _scan_only)


# -- targeted cases that the random search may take long to hit ---------------------------


@pytest.mark.parametrize("depth", [1, 50, 200, 1000, 5000, 50_000])
@pytest.mark.parametrize("seed_name", ["explicit_le", "implicit_le", "explicit_be"])
@pytest.mark.parametrize("rest", ["dropped", "kept"])
def test_unclosed_nested_sequences(tmp_path: Path, seed_name: str, depth: int, rest: str) -> None:
    """Undefined-length sequences never closed, nested deeper than any recursive parser's
    stack: a typed error (or a parse that swallowed them), never RecursionError."""
    s = seed(seed_name)
    before = next(e for e in s.elements if e.tag > 0x00080000)
    body = (
        s.body[: before.start]
        + unclosed_sequences(s, depth)
        + (s.body[before.start :] if rest == "kept" else b"")
    )
    path = tmp_path / "deep.dcm"
    path.write_bytes(s.meta + body)
    check_node_parsers(path, FUZZ_LIMITS)


@pytest.mark.parametrize(
    "keyword_tag,vr,value",
    [
        (0x00280010, b"US", b"\x40\x00\x00"),  # Rows, 3 bytes for a 2-byte VR
        (0x00280011, b"US", b"\x40"),  # Columns, 1 byte
        (0x00280100, b"US", b"\x10\x00\x00\x00\x00"),  # BitsAllocated, 5 bytes
        (0x00280030, b"FD", b"\x00" * 7),  # a float VR with a length not a multiple of 8
        (0x00281050, b"DS", b"nan "),  # Window Center "nan"
        (0x00281051, b"DS", b"inf "),  # Window Width "inf"
        (0x00281052, b"DS", b"NaN "),  # Rescale Intercept
        (0x00281053, b"DS", b"1e308\\"),  # Rescale Slope overflows when applied
        (0x00280008, b"IS", b"-1"),  # Number of Frames
        (0x00280008, b"IS", b"99999999999999999999"),
        (0x00280002, b"US", b"\x00\x00"),  # Samples per Pixel 0
        (0x00200013, b"IS", b"abc "),  # Instance Number not a number
        (0x00100010, b"PN", b"\x1b$B\x1b(B\x00\xff\xfe"),  # ISO 2022 escapes and junk in a name
        (0x00080005, b"CS", b"ISO 2022 IR 87\\ISO_IR 999"),  # an unknown character set
    ],
)
def test_wrong_values_in_indexed_and_pixel_attributes(
    tmp_path: Path, keyword_tag: int, vr: bytes, value: bytes
) -> None:
    """Values that break their VR where the parsers read them (lazy conversion happens
    after the file is 'read', so this is where untyped pydicom errors escape)."""
    import struct

    s = seed("explicit_le")
    if len(value) % 2:
        value += b"\x00" if vr in (b"US", b"FD", b"UI") else b" "
        value = value if vr != b"US" else value[:-1]  # keep the odd length for binary VRs
    el = next((e for e in s.elements if e.tag == keyword_tag), None)
    new = (
        struct.pack("<HH", keyword_tag >> 16, keyword_tag & 0xFFFF)
        + vr
        + struct.pack("<H", len(value))
        + value
    )
    if el is None:
        after = next(e for e in s.elements if e.tag > keyword_tag)
        body = s.body[: after.start] + new + s.body[after.start :]
    else:
        body = s.body[: el.start] + new + s.body[el.value_at + el.length :]
    path = tmp_path / "wrong.dcm"
    path.write_bytes(s.meta + body)
    check_node_parsers(path, FUZZ_LIMITS)


# -- decompression bombs: refused before allocation, at the node's default limits --------


BOMB_SCRIPT = HERE / "hostile_bomb_child.py"


def test_decompression_bombs_are_refused_before_allocation() -> None:
    """In a child process (so that its peak RSS is its own): every bomb of
    hostile_bomb_child.BOMBS at the *default* limits, measured by ru_maxrss (what C
    decoders allocate too) and tracemalloc. None may allocate more than a small multiple
    of what a real chest image needs."""
    out = subprocess.run(
        [sys.executable, str(BOMB_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    bad = {name: r for name, r in report["cases"].items() if not r["ok"]}
    assert not bad, bad


@BOMBS_CI
@given(case=bombs())
def test_fuzzed_bombs_stay_within_the_limits(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[str, bytes]
) -> None:
    desc, data = case
    path = tmp_path_factory.getbasetemp() / "bomb.dcm"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        check_header(path)
        result = check_pixels(path, FUZZ_LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FUZZ_PEAK_MB * 2**20, f"{desc}: {result}, peak {peak / 2**20:.0f} MiB"
