"""The DICOM objects the node sends back into the source study.

- :mod:`.sr`: Comprehensive 3D SR, TID 1500 Measurement Report: each reported finding an
  outline on its image (from :mod:`.region`), everything else as qualitative evaluations;
- :mod:`.pmap`: the heat maps of one image as one Parametric Map (float, real-world value
  mapping per finding);
- :mod:`.overlay`: the findings of one image drawn on it, as one JPEG Secondary Capture,
  and :func:`render_png`;
- :mod:`.content`, :mod:`.equipment`, :mod:`.codes`: what all of them share (patient and
  study attributes with their character set, IHE AIR style equipment, coded concepts);
- :mod:`.build`: :func:`build_results`, all objects of one analysis (or in two phases,
  :func:`build_sr_result` then :func:`add_heat_map_objects`).
"""

from ddn_node.dicom.results.build import (
    ResultObjects,
    SeriesNumbers,
    add_heat_map_objects,
    build_results,
    build_sr_result,
)
from ddn_node.dicom.results.overlay import render_png
from ddn_node.dicom.results.sr import SRReference

__all__ = [
    "ResultObjects",
    "SRReference",
    "SeriesNumbers",
    "add_heat_map_objects",
    "build_results",
    "build_sr_result",
    "render_png",
]
