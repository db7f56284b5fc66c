"""What a received instance is: an image from an acquisition, a result this node made, or
a result some other algorithm or workstation made.

A PACS sends a study on, results included: an auto-routing rule fires again when the
node's own SR, Parametric Map and Secondary Capture arrive, and other AI products add
theirs. None of those is a source image, and treating one as a late image of the study
re-opens it and analyses it again - the loop a PACS administrator switches a node off for.
The SCP therefore classifies every instance from its header, before it is stored:

- **own**: General Equipment says this node made it (Manufacturer's Model Name
  ``ddn-node``, PS3.3 C.7.5.1), or its Contributing Equipment Sequence (C.12.1) names one
  of this node's models by Device UID (IHE AI Results);
- **other**: a result object by its SOP class (structured reports, key objects,
  presentation states, segmentations, parametric maps, RT structures, encapsulated
  documents), a derived secondary image (Image Type ``DERIVED\\SECONDARY``, C.7.6.1.1.2),
  or anything whose Contributing Equipment says an algorithm processed it (Purpose of
  Reference "Processing Equipment" 109102, DCM, or IHE AIR's "Processing Algorithm"
  Newcode1, 99IHE);
- **source**: everything else - including Secondary Captures with Conversion Type ``WSD``
  (C.8.6.1): digitised chest films are routinely converted that way (the public chest
  X-ray sets are CR-labelled WSD captures), so the conversion type says nothing about
  whether a picture is a result.

Only a source image can re-open a completed study, and only one a routing rule selects
(``store/ingest.py``); what happens to results is configured (``[ingest]``).
"""

from __future__ import annotations

from collections.abc import Collection

from ddn_node.dicom.headers import Header
from ddn_node.vocabulary import InstanceOrigin

# The Manufacturer's Model Name the node writes into every object it makes (its results'
# General Equipment): defined here, where it is recognised, so the SCP's import of this
# module does not draw in the result builders and their rendering libraries.
NODE_MODEL_NAME = "ddn-node"

# Storage SOP classes whose instances are results, never acquisitions (PS3.4 B.5).
RESULT_SOP_CLASS_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports of every kind, key objects (88.59)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66.",  # segmentation, surface segmentation, registrations
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL ...
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
)
RESULT_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
        "1.2.840.10008.5.1.4.1.1.67",  # Real World Value Mapping
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
    }
)
PROCESSING_PURPOSES: frozenset[str] = frozenset({"109102^DCM", "Newcode1^99IHE"})


def is_result_class(sop_class_uid: str) -> bool:
    return sop_class_uid in RESULT_SOP_CLASSES or sop_class_uid.startswith(
        RESULT_SOP_CLASS_PREFIXES
    )


def classify(header: Header, own_device_uids: Collection[str] = ()) -> InstanceOrigin:
    """The origin of one instance, from its header (see the module docstring)."""
    if header.text("ManufacturerModelName").strip() == NODE_MODEL_NAME:
        return InstanceOrigin.OWN
    devices = {uid for uid in header.text("ContributingDeviceUIDs").split("\\") if uid}
    if devices & set(own_device_uids):
        return InstanceOrigin.OWN
    if is_result_class(header.text("SOPClassUID")):
        return InstanceOrigin.OTHER
    image_type = [part.strip().upper() for part in header.text("ImageType").split("\\")]
    if image_type[:2] == ["DERIVED", "SECONDARY"]:
        return InstanceOrigin.OTHER
    purposes = {p for p in header.text("ContributingPurposes").split("\\") if p}
    if purposes & PROCESSING_PURPOSES:
        return InstanceOrigin.OTHER
    return InstanceOrigin.SOURCE
