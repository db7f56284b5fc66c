"""Structured logging: JSON events through structlog, with patient data kept out.

Event names are dotted and stable (``scp.instance_stored``, ``worker.study_analysed``) so
operators can alert on them; docs/operations.md lists them. Log lines carry UIDs and the
node's own row ids, never patient names, IDs, birth dates or accession numbers: the
processor below drops such keys as a second line of defence, and third-party loggers that
may print datasets (pynetdicom at DEBUG) are held at WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import structlog

# Keys that must never reach a log line, whatever the caller passes.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "accession_number",
        "accession",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "other_patient_ids",
        "referring_physician",
    }
)


def drop_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


def _mark_demo(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["demo"] = True
    return event_dict


def _add_fields(
    fields: dict[str, Any], _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def configure_logging(
    level: str = "INFO",
    json_output: bool = True,
    file: Path | None = None,
    stream: TextIO | None = None,
    *,
    demo: bool = False,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Configure structlog and the standard library once, at process start. In a demo
    (``demo = true``) every line says so, so that no one mistakes its log for a
    hospital node's."""
    out: TextIO
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        out = open(file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process
        # The log names studies and peers: the node's user alone reads it, also when the
        # file was there before (made by a service manager, or by an older version).
        os.fchmod(out.fileno(), 0o600)
    else:
        out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    if demo:
        shared.append(_mark_demo)
    if fields:
        # Said on every line of the process, from every thread (one of several SCP
        # processes says which it is).
        shared.append(partial(_add_fields, dict(fields)))
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # One write per line (print() writes the line, then its newline): several SCP
        # processes append to the same stream, and two writes per line let another
        # process's line land between a line and its newline.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Route the standard library (uvicorn, apscheduler, pynetdicom) through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # highdicom narrates every module it copies at INFO: not events of the node.
    for noisy in ("pynetdicom", "apscheduler", "uvicorn.access", "httpx", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom warns about every out-of-spec value in real headers; the node stores such
    # data as it came, so those warnings are noise (and may quote patient data).
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
