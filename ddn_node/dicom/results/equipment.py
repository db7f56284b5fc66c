"""Who made a result: equipment attributes and algorithm identification.

Three places describe the producer, each for its own readers:

- General Equipment (PS3.3 C.7.5.1; Enhanced General Equipment C.7.5.2 for the
  Parametric Map, where all four attributes are Type 1): the *node software* that wrote
  the object (:func:`general_equipment`);
- Contributing Equipment Sequence (0018,A001) (SOP Common, PS3.3 C.12.1): one item for the
  *AI model*, in the style of IHE AI Results (AIR) Rev 1.1 6.5.3.1 - Manufacturer,
  Manufacturer's Model Name, Software Versions, Device UID (0018,1002) that changes with
  the weights, and a Purpose of Reference code (:func:`algorithm_equipment`);
- in the SR, the observer context (TID 1002 / TID 1004 Device Observer, with the Device
  UID) and Algorithm Identification (TID 4019) in every measurement group
  (:func:`device_observer`, :func:`algorithm_identification`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from highdicom import ContributingEquipment
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    ObserverContext,
)
from pydicom.sr.codedict import codes

from ddn_node.dicom.origin import NODE_MODEL_NAME
from ddn_node.dicom.results.codes import PROCESSING_EQUIPMENT, coded
from ddn_node.dicom.results.content import NOT_FOR_DIAGNOSTIC_USE, fit_text
from ddn_node.model.types import AlgorithmInfo

# VR lengths (PS3.5 6.2): LO 64, ST 1024.
_LO = 64


def _node_version() -> str:
    try:
        return version("ddn-node")
    except PackageNotFoundError:  # a source tree without installation
        return "0.0.0+source"


@dataclass(frozen=True)
class Equipment:
    """General Equipment (C.7.5.1) / Enhanced General Equipment (C.7.5.2) attributes."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: list[str]
    device_serial_number: str


def general_equipment(algorithm: AlgorithmInfo) -> Equipment:
    """What highdicom's constructors take as the General Equipment attributes.

    The node software wrote the object: Manufacturer is the model's manufacturer (the
    project), the model name is the node, Software Versions carry the node version and
    the model artifact version. The Device Serial Number (Type 1 in Enhanced General
    Equipment) is the model's Device UID: it identifies the exact weights that produced
    the content, which is what a serial number is for in a recall.
    """
    return Equipment(
        manufacturer=fit_text(algorithm.manufacturer, _LO),
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=[
            fit_text(algorithm.software_version or _node_version(), _LO),
            fit_text(algorithm.version, _LO),
        ],
        device_serial_number=fit_text(algorithm.device_uid, _LO),
    )


def algorithm_equipment(
    algorithm: AlgorithmInfo, contributed_at: datetime.datetime | None = None
) -> ContributingEquipment:
    """The Contributing Equipment item that describes the AI model (IHE AIR 6.5.3.1).

    AIR asks to change the Device UID whenever the model changes (for example by
    training); :attr:`AlgorithmInfo.device_uid` is derived from the weights' hash.
    """
    description = f"AI inference: {algorithm.name} {algorithm.version}"
    if algorithm.is_demo:
        description += f" - {NOT_FOR_DIAGNOSTIC_USE} (demonstration model)"
    item = ContributingEquipment(
        manufacturer=fit_text(algorithm.manufacturer, _LO),
        purpose_of_reference=coded(PROCESSING_EQUIPMENT),
        manufacturer_model_name=fit_text(algorithm.name, _LO),
        software_versions=fit_text(algorithm.version, _LO),
        contribution_datetime=contributed_at or datetime.datetime.now(datetime.UTC),
        contribution_description=fit_text(description, 1024),
    )
    item.DeviceUID = algorithm.device_uid
    return item


def algorithm_identification(
    algorithm: AlgorithmInfo, parameters: list[str] | None = None
) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification: name, version, manufacturer, parameters."""
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        manufacturer=algorithm.manufacturer,
        parameters=parameters,
    )


def device_observer(algorithm: AlgorithmInfo) -> ObserverContext:
    """TID 1002 Observer Context with TID 1004 Device Observer Identifying Attributes.

    The Device Observer UID is the model's Device UID, the same as in the Contributing
    Equipment item, so a reader can join the SR content to the equipment description.
    """
    return ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=fit_text(algorithm.name, _LO),
            manufacturer_name=fit_text(algorithm.manufacturer, _LO),
            model_name=fit_text(algorithm.name, _LO),
        ),
    )
