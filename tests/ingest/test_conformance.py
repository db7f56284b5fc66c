"""The conformance statement is generated from the code and says what the AE negotiates."""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom import AE
from pynetdicom.presentation import build_context

from ddn_node.dicom.conformance import render

UID = r"[0-9]+(?:\.[0-9]+)+"


def _doc(repo_root: Path) -> str:
    return (repo_root / "docs" / "conformance-statement.md").read_text()


def test_committed_statement_is_the_generated_one(repo_root: Path) -> None:
    assert _doc(repo_root) == render(), (
        "run: ddn-node conformance --out docs/conformance-statement.md"
    )


def _section(doc: str, start: str, end: str) -> str:
    return doc[doc.index(start) : doc.index(end)]


def test_listed_classes_and_syntaxes_are_exactly_what_is_negotiated(
    make_node, sqlite_url: str, repo_root: Path
) -> None:
    doc = _doc(repo_root)
    classes = re.findall(
        rf"\| ({UID}) \|", _section(doc, "Storage SOP classes accepted as SCP", "</details>")
    )
    syntaxes = re.findall(rf"\| ({UID}) \|", _section(doc, "#### 2.2.3", "#### 2.2.4"))
    assert len(classes) > 150 and "1.2.840.10008.1.2.1" in syntaxes
    unlisted_class, unlisted_syntax = (
        "1.2.826.0.1.3680043.8.498.999.1",
        "1.2.840.10008.1.2.4.100",
    )  # private; MPEG2
    pairs = [(c, t) for c in [*classes, unlisted_class] for t in [*syntaxes, unlisted_syntax]]
    accepted: set[tuple[str, str]] = set()
    node = make_node(sqlite_url)
    with node:
        for start in range(0, len(pairs), 128):
            ae = AE(ae_title="TESTSCU")
            ae.requested_contexts = [build_context(c, [t]) for c, t in pairs[start : start + 128]]
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DDN_NODE")
            if assoc.is_established:
                accepted |= {
                    (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts
                }
                assoc.release()
    expected = {(c, t) for c in classes for t in syntaxes}
    assert accepted == expected
