"""A clock the test moves: delays, back-offs and leases come due when the test says, never
because a loaded machine was slow (inject it where the code takes ``clock=``)."""

from __future__ import annotations

import datetime as dt


class ManualClock:
    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now
