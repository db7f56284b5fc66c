"""Recording a radiologist's feedback from the page or the API: one call, one set of answers.

Both routes parse their own input (a form whose field names carry labels; a JSON body),
then hand the verdicts here, which records them and maps what ``store.feedback`` refuses
to the HTTP statuses both document: 404 no such study, 409 no result or a stale one, 422
a label or verdict that cannot be recorded.
"""

from __future__ import annotations

import structlog
from fastapi import HTTPException, Request

from ddn_node.store.feedback import (
    FeedbackRefused,
    NoResult,
    Review,
    StaleResult,
    record_feedback,
)
from ddn_node.vocabulary import Verdict
from ddn_node.web.auth import Principal

log = structlog.get_logger("ddn_node.web")


def submit_feedback(
    request: Request,
    principal: Principal,
    study_uid: str,
    *,
    verdicts: dict[str, Verdict],
    missed: list[str],
    absent_confirmed: bool,
    note: str,
    generation: int | None,
    host: str,
    via: str,
) -> Review:
    """Record one review (blocking: call it from a worker thread), or raise HTTPException."""
    try:
        review = record_feedback(
            request.app.state.database,
            study_uid,
            verdicts=verdicts,
            missed=missed,
            absent_confirmed=absent_confirmed,
            note=note,
            generation=generation,
            user=principal.actor,
            host=host,
            via=via,
        )
    except NoResult as exc:
        raise HTTPException(status_code=409 if exc.study_exists else 404, detail=str(exc)) from None
    except StaleResult as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except FeedbackRefused as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    log.info(
        "web.feedback_recorded",
        study_uid=study_uid,
        generation=review.generation,
        labels=len(review.findings),
        user=principal.actor,
    )
    return review
