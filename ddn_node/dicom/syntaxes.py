"""What the node negotiates: the Storage SOP classes and the transfer syntaxes it accepts.

Derived from the installed libraries, not typed in by hand, so the conformance statement
(docs/conformance-statement.md, checked by a test) and the AE cannot drift apart: a
transfer syntax is offered exactly when an installed pixel decoder can read it.
"""

from __future__ import annotations

from functools import cache

from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts


@cache
def supported_transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax an installed pydicom decoder plugin can decode."""
    out = []
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        if decoder.is_available:
            out.append(str(uid))
    return tuple(out)


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP class pynetdicom knows (PS3.4 Annex B.5), images and non-images."""
    return tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
