"""What the node's database says about its deliveries, read from outside the node process."""

from __future__ import annotations

from sqlalchemy import select

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Result, Study
from ddn_node.vocabulary import DeliveryState


def delivery_rows(db_url: str) -> list[Delivery]:
    """Every delivery row, in the order they were queued."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))
    finally:
        db.dispose()


def delivery_summary(db_url: str) -> str:
    """The one study's worklist line saying where its results went."""
    db = make_database(db_url)
    try:
        with db.read() as s:
            return str(s.scalars(select(Study.delivery_summary)).one())
    finally:
        db.dispose()


def all_delivered(db_url: str, studies: int = 1) -> bool:
    """``studies`` analyses complete, their pictures too, and every object they queued sent.

    The SR goes out before the heat maps are drawn, so "every delivery sent" alone can be
    true for a moment between the two; ``Result.completed_at`` is set only after the
    pictures' deliveries are recorded.
    """
    db = make_database(db_url)
    try:
        with db.read() as s:
            complete = len(
                list(s.scalars(select(Result.id).where(Result.completed_at.is_not(None))))
            )
            states = list(s.scalars(select(Delivery.state)))
    finally:
        db.dispose()
    return (
        complete >= studies
        and bool(states)
        and all(state == DeliveryState.SENT for state in states)
    )
