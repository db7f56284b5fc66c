"""What the node's database says about its deliveries, read from outside the node process."""

from __future__ import annotations

from sqlalchemy import select

from ddn_node.store.engine import make_database
from ddn_node.store.models import Delivery, Study


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
