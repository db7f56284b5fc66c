"""How soon a study is analysed: its class in the analysis queue.

The worker claims the most urgent job first, first in, first out within a class
(``store/queue.py``), so a STAT chest film from the emergency department is not analysed
after a morning's backlog of routine ones. A study's class is the most urgent of:

* what its order says: Requested Procedure Priority (0040,1003) or Scheduled Procedure
  Step Priority (0074,1200), as its images carry them (``dicom/headers.order_priority``);
* every ``[[queue.urgency]]`` rule that matches where it comes from (calling AE, Station
  Name, Institutional Department Name).

ROUTINE when neither says anything. The most urgent wins because each source only ever
knows more about one study: an order marked ROUTINE from a department the site treats as
urgent is urgent, and a LOW rule (a research feed) never delays an order marked STAT.
This is the queue's order only: the reading priority on the worklist is triage's, from the
findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ddn_node.config import UrgencyRule
from ddn_node.vocabulary import ORDER_PRIORITIES, URGENCY_RANK, Urgency


@dataclass(frozen=True)
class Urgent:
    urgency: Urgency
    reason: str  # for the completion log: which source decided

    @property
    def rank(self) -> int:
        return URGENCY_RANK[self.urgency]


def decide_urgency(
    rules: Sequence[UrgencyRule],
    *,
    order_priority: str,
    calling_ae: str,
    station: str,
    department: str,
) -> Urgent:
    said: list[Urgent] = []
    ordered = ORDER_PRIORITIES.get(order_priority.strip().upper())
    if ordered is not None:
        said.append(Urgent(ordered, f"order priority {order_priority.strip().upper()}"))
    for i, rule in enumerate(rules):
        if rule.matches(calling_ae, station, department):
            said.append(Urgent(rule.urgency, f"queue.urgency[{i}]"))
    if not said:
        return Urgent(Urgency.ROUTINE, "no order priority, no rule")
    # min() keeps the first of equals: the order before the rules, rules in file order.
    return min(said, key=lambda u: u.rank)
