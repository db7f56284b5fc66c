"""Every real DICOM file in ../shared/data/dicom goes in over the network.

Each is either stored (the stored data set equal to the sent one, attribute for attribute
and pixel for pixel, since the transfer syntax is kept) or refused with the right status,
and the node keeps serving. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from sqlalchemy import func, select
from support.dicomgen import make_cr, raw_association, store_file, to_file_bytes
from support.net import wait_for

from ddn_node.dicom.scu import Peer, StoreSCU
from ddn_node.store.engine import make_database
from ddn_node.store.models import Instance, Study


def _real_files(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom").rglob("*.dcm"))


def _storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "DDN_NODE",
            "-R",
            "-xv",
            "-nh",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _same_dataset(sent: Path, stored: Path) -> list[str]:
    """Differences between two data sets, ignoring File Meta Information."""
    a = pydicom.dcmread(sent, force=True)
    b = pydicom.dcmread(stored, force=True)
    diffs = []
    for elem in a:
        # File meta is each side's own; group lengths are retired (PS3.5 7.2) and a
        # sender that re-encodes (e.g. for a file whose meta and data set disagree)
        # recomputes them.
        if elem.tag.group == 0x0002 or elem.tag.element == 0x0000:
            continue
        if elem.tag == 0xFFFCFFFC:  # Data Set Trailing Padding: no meaning (PS3.10 7.2)
            continue
        if elem.tag not in b:
            diffs.append(f"{elem.keyword or elem.tag} missing")
        elif b[elem.tag].value != elem.value:
            diffs.append(f"{elem.keyword or elem.tag} differs")
    return diffs


def test_every_real_file(make_node, db_url: str, shared_data: Path) -> None:
    files = _real_files(shared_data)
    assert len(files) > 60
    node = make_node(db_url)
    unsendable: list[str] = []
    sent_ok: dict[str, Path] = {}
    with node:
        scu = StoreSCU("TESTSCU", Peer("DDN_NODE", "127.0.0.1", node.port))
        for path in files:
            outcome = scu.send([path])[0]
            if outcome.status is None:
                # Our sender could not read it (no file meta, truncated): DCMTK may still send it.
                result = _storescu(node.port, path)
                if result.returncode == 0 and "Store Failed" not in result.stderr:
                    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
                    sent_ok[str(ds.SOPInstanceUID)] = path
                else:
                    unsendable.append(f"{path.name}: {outcome.error}")
                continue
            assert outcome.status == 0x0000, f"{path.name} refused with 0x{outcome.status:04X}"
            sent_ok[outcome.sop_instance_uid] = path
        assert StoreSCU("ECHOSCU", Peer("DDN_NODE", "127.0.0.1", node.port)).echo() == 0

    db = make_database(db_url)
    try:
        with db.read() as s:
            stored = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
            n_studies = s.scalar(select(func.count()).select_from(Study))
    finally:
        db.dispose()
    assert set(sent_ok) <= set(stored), "acknowledged but not in the database"
    for sop_uid, path in sent_ok.items():
        inst = stored[sop_uid]
        file = node.spool / inst.path
        assert file.is_file()
        assert _same_dataset(path, file) == [], path.name
    assert n_studies >= 10
    # Real data reuses SOP Instance UIDs across files (one image in several syntaxes, in
    # the same study): the node analyses the last one sent (a changed re-send replaces;
    # tests/ingest/test_identity.py: the earlier version is kept beside it).
    print(f"stored {len(sent_ok)} of {len(files)} files; unsendable by any sender: {unsendable}")
    # Only files without a SOP Class / Instance UID can be sent by nobody.
    assert all("no attribute 'SOP" in u for u in unsendable), unsendable


def test_refusals_have_the_right_status(make_node, sqlite_url: str, tmp_path: Path) -> None:
    node = make_node(sqlite_url)
    good = make_cr("1.2.3.4.5.6.7")
    no_study = make_cr("9.9.9")
    del no_study.StudyInstanceUID
    mismatch = make_cr("1.2.3.4.5.6.8")
    garbage = bytearray(to_file_bytes(make_cr("1.2.3.4.5.6.9")))

    paths = {}
    for name, ds in (("good", good), ("no_study", no_study), ("mismatch", mismatch)):
        data = bytearray(to_file_bytes(ds))
        if name == "mismatch":
            # The command carries the file meta's UID; make the data set's UID different.
            uid = str(ds.SOPInstanceUID).encode()
            first = data.find(uid)
            second = data.find(uid, first + 1)
            data[second : second + len(uid)] = uid[:-1] + (b"8" if uid[-1:] != b"8" else b"7")
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(bytes(data))
    # Keep valid File Meta but make the data set unparseable: an element whose length
    # runs far past the end of the data.
    meta_end = garbage.find(b"\x08\x00")  # first data set element after the meta group
    meta_end = garbage.find(b"\x08\x00", 132 + 12)
    garbage[meta_end:] = b"\x08\x00\x16\x00UI\xff\x7f" + b"\x00" * 16
    paths["garbage"] = tmp_path / "garbage.dcm"
    paths["garbage"].write_bytes(bytes(garbage))

    with node, raw_association(node.port) as assoc:
        assert store_file(assoc, paths["good"]) == 0x0000
        assert store_file(assoc, paths["good"]) == 0x0000  # duplicate: idempotent
        assert store_file(assoc, paths["no_study"]) == 0xC001
        assert store_file(assoc, paths["mismatch"]) == 0xC002
        assert store_file(assoc, paths["garbage"]) in (0xC000, 0xC001)
        assert store_file(assoc, paths["good"]) == 0x0000  # still serving on the same association
    db = make_database(sqlite_url)
    try:
        with db.read() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 1
            study = s.scalars(select(Study)).one()
            assert study.num_instances == 1
    finally:
        db.dispose()
    events = {e["event"] for e in node.events()}
    assert {"scp.store_missing_uid", "scp.store_uid_mismatch"} <= events


def test_indexed_attributes_for_the_worklist(make_node, db_url: str, tmp_path: Path) -> None:
    """The rows hold what the worklist shows, so the web part never opens a file."""
    node = make_node(db_url)
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    ds = make_cr(
        study_uid,
        patient_name="Müller^Anna",
        patient_id="P-77",
        accession="A-99",
        view="AP",
        modality="DX",
    )
    path = tmp_path / "a.dcm"
    path.write_bytes(to_file_bytes(ds))
    with (
        node,
        raw_association(
            node.port, contexts=[(str(ds.SOPClassUID), "1.2.840.10008.1.2.1")]
        ) as assoc,
    ):
        assert store_file(assoc, path) == 0
    db = make_database(db_url)
    try:
        with db.read() as s:
            study = wait_for(lambda: s.scalars(select(Study)).one(), 5, "study row")
            inst = s.scalars(select(Instance)).one()
    finally:
        db.dispose()
    assert (study.patient_name, study.patient_id, study.accession_number) == (
        "Müller^Anna",
        "P-77",
        "A-99",
    )
    assert (study.modalities, study.body_part, study.calling_ae) == ("DX", "CHEST", "TESTSCU")
    assert (study.study_date, study.study_time) == ("20261127", "101500")
    assert (inst.view_position, inst.rows, inst.columns, inst.photometric) == (
        "AP",
        64,
        64,
        "MONOCHROME2",
    )
    assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    # No patient data in the logs.
    log = node.log_path.read_text()
    for secret in ("Müller", "P-77", "A-99"):
        assert secret not in log


def test_resends_keep_one_copy_when_identical_and_every_version_when_changed(
    make_node, db_url: str, tmp_path: Path
) -> None:
    from support.dicomgen import dataset_sha256

    from ddn_node.store.models import InstanceVersion

    first, changed = tmp_path / "first.dcm", tmp_path / "changed.dcm"
    for path, seed in ((first, 1), (changed, 2)):  # same UIDs, other pixels
        ds = make_cr("1.2.3.77", series_uid="1.2.3.77.0", sop_uid="1.2.3.77.1", seed=seed)
        path.write_bytes(to_file_bytes(ds))
    node = make_node(db_url)
    folder = node.spool / "studies" / "1.2.3.77"
    with node, raw_association(node.port) as assoc:
        assert store_file(assoc, first) == 0
        assert store_file(assoc, first) == 0  # identical: no second copy
        assert len(list(folder.iterdir())) == 1
        assert store_file(assoc, changed) == 0  # changed: both versions on disk
    assert len(list(folder.iterdir())) == 2
    db = make_database(db_url)
    try:
        with db.read() as s:
            inst = s.scalars(select(Instance)).one()
            version = s.scalars(select(InstanceVersion)).one()
    finally:
        db.dispose()
    assert dataset_sha256(node.spool / inst.path) == dataset_sha256(changed) == inst.sha256
    assert dataset_sha256(node.spool / version.path) == dataset_sha256(first) == version.sha256
