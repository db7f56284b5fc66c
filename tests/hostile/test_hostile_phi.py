"""No patient data in the node's log, however hostile the values that carry it.

Instances whose PatientName, PatientID, PatientBirthDate and AccessionNumber hold markup,
control characters, ISO 2022 escape sequences, over-long and VR-breaking values go in
through C-STORE, stored or refused (UID mismatch, unparseable). Libraries warn about
invalid values, and their warnings often quote the value ("Invalid value for VR DA:
'...'"); none of that may reach the log. The log is grepped for every value sent, and
for its distinctive fragments.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

pytestmark = pytest.mark.slow

# Distinctive markers: each appears in one value only, so a hit says which leaked.
NAMES = [
    "<script>alert('XSSNAME')</script>^Evil",
    "Ctrl\x07\x1b[2JNAMEBELL^Ann",
    "Toolong" + "X" * 80 + "^LONGNAME",
    "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",  # ISO 2022 IR 87 (Japanese)
]
IDS = ["PIDMARK<b>1</b>", "PIDMARK\\2", "PIDMARK\x00NUL3"]
ACCESSIONS = ["ACCMARK'; DROP TABLE study;--", "ACCMARK" + "9" * 40]
BIRTH_DATES = ["1970-01-01BDMARK", "19700101"]


def _cases() -> list[tuple[str, Any, str]]:
    """(name, dataset, charset) combinations; every value is used at least once."""
    out = []
    n = 0
    for name in NAMES:
        for pid in IDS:
            n += 1
            charset = "ISO 2022 IR 87" if "\x1b$B" in name else "ISO_IR 192"
            acc = ACCESSIONS[n % len(ACCESSIONS)]
            ds = make_cr(
                f"1.2.826.0.1.3680043.10.1.88.{n}", patient_name="X", patient_id="X", accession="X"
            )
            ds.SpecificCharacterSet = charset
            ds.PatientName = name
            ds.PatientID = pid
            ds.AccessionNumber = acc
            ds.PatientBirthDate = BIRTH_DATES[n % len(BIRTH_DATES)]
            out.append((f"case{n}", ds, charset))
    return out


def _raw_pn(data: bytes, value: bytes) -> bytes:
    """Replace the PatientName value in an explicit VR LE file with raw bytes (so the
    ISO 2022 escapes go as they are, not as pydicom would encode them)."""
    at = data.find(b"\x10\x00\x10\x00PN")
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    if len(value) % 2:
        value += b" "
    return (
        data[:at]
        + b"\x10\x00\x10\x00PN"
        + struct.pack("<H", len(value))
        + value
        + data[at + 8 + length :]
    )


def _fragments(value: str) -> list[str]:
    """What to grep for: the whole value and its marker words (a log may escape the rest)."""
    frags = [value] + [
        w
        for w in (
            "XSSNAME",
            "NAMEBELL",
            "LONGNAME",
            "Yamada",
            "Tarou",
            "PIDMARK",
            "ACCMARK",
            "BDMARK",
        )
        if w in value
    ]
    return frags


def test_hostile_patient_data_never_reaches_the_log(
    make_node: Any, sqlite_url: str, tmp_path: Path
) -> None:
    node = make_node(sqlite_url, logging={"level": "DEBUG", "json": True})
    cases = _cases()
    with node, raw_association(node.port) as assoc:
        for name, ds, charset in cases:
            data = to_file_bytes(ds)
            if charset == "ISO 2022 IR 87":
                data = _raw_pn(data, str(ds.PatientName).encode("latin-1", errors="replace"))
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(data)
            assert store_file(assoc, path) == 0x0000, name
            # The same data set under another SOP Instance UID in the command: 0xC002,
            # which is logged.
            mismatch = bytearray(data)
            uid = str(ds.SOPInstanceUID).encode()
            first = mismatch.find(uid)
            mismatch[first : first + len(uid)] = uid[:-1] + (b"7" if uid[-1:] != b"7" else b"8")
            path.write_bytes(bytes(mismatch))
            assert store_file(assoc, path) == 0xC002, name
            # And truncated inside the patient module: unparseable or missing UIDs, logged.
            cut = data.find(b"\x10\x00\x20\x00LO") + 10
            path.write_bytes(data[:cut])
            assert store_file(assoc, path) in (0xC000, 0xC001), name
    wait_for(
        lambda: (
            sum(1 for e in node.events() if e.get("event") == "scp.instance_stored") >= len(cases)
        ),
        10,
        "stored events",
    )
    log = node.log_path.read_text(errors="replace")
    secrets = {f for v in NAMES + IDS + ACCESSIONS + BIRTH_DATES[:1] for f in _fragments(v)}
    leaked = sorted(s for s in secrets if s in log)
    assert not leaked, f"patient data in the log: {leaked}"
    # Nothing that looks like a value the parser warned about either.
    assert "Invalid value for VR" not in log
