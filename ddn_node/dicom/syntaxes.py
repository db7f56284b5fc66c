"""What the node negotiates: the Storage SOP classes and the transfer syntaxes it accepts.

Derived from the installed libraries, not typed in by hand, so the conformance statement
(docs/conformance-statement.md, checked by a test) and the AE cannot drift apart: a
transfer syntax is offered exactly when an installed pixel decoder can read it
(tests/model/test_decode_census.py proves it on a real file of each).
"""

from __future__ import annotations

from functools import cache

from pydicom._uid_dict import UID_dictionary
from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ddn_node.dicom.isolated import command_for
from ddn_node.dicom.pixels import NEEDS_ISOLATED

# PS3.7 D.3.3.2: identifies this implementation in every association. A UUID-derived UID
# (PS3.5 B.2), as the project has no registered root of its own.
IMPLEMENTATION_CLASS_UID = "2.25.220343552415676384100532528164694577535"


def implementation_version_name() -> str:
    """PS3.7 D.3.3.2.3: up to 16 characters, e.g. DDN_NODE_0.1.0."""
    from ddn_node import __version__

    return f"DDN_NODE_{__version__}"[:16]


@cache
def supported_transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax an installed pydicom decoder plugin can decode, in preference order.

    pynetdicom accepts, for each proposed context, the first syntax of this list that the
    requestor proposed. Explicit VR Little Endian comes first because every sender can
    produce it (a sender that proposes JPEG 2000 for an uncompressed file cannot encode it,
    DCMTK storescu -xv for one) and it keeps private elements' VRs; then Implicit VR; then
    the compressed syntaxes, accepted as they are when a context proposes only them. A
    syntax whose real files the in-process decoders do not read (:data:`NEEDS_ISOLATED`)
    is offered only when its isolated decoder is installed.
    """
    out = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        if uid in NEEDS_ISOLATED and command_for(uid) is None:
            continue
        if decoder.is_available and str(uid) not in out:
            out.append(str(uid))
    return tuple(out)


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP class of the standard (PS3.4 Annex B.5), current and retired.

    pynetdicom's list omits retired classes, but archives still push them (the retired
    Ultrasound Image Storage, for one); pydicom's UID dictionary has them all. Storage
    Commitment, media directories and print objects are not storage of instances.
    """
    uids = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    uids |= {
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and uid.startswith("1.2.840.10008.5.1.4.")
    }
    ordered = tuple(sorted(uids, key=lambda u: [int(p) for p in u.split(".")]))
    for uid in ordered:
        # pynetdicom only dispatches C-STORE for classes it knows: teach it the rest.
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(
                uid,
                UID_dictionary[uid][4] or f"Storage_{uid.replace('.', '_')}",
                StorageServiceClass,
            )
    return ordered
