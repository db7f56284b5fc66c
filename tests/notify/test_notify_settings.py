"""[adapters.hl7] messages: what an administrator can write, and what is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ddn_node.config import AdaptersSettings, Settings


def test_oru_alone_is_the_default() -> None:
    assert AdaptersSettings().hl7.messages == ["oru"]


@pytest.mark.parametrize("messages", [[], ["oru", "oru"], ["omg"]])
def test_empty_repeated_or_unknown_messages_are_refused(messages: list[str]) -> None:
    with pytest.raises(ValidationError):
        AdaptersSettings.model_validate({"hl7": {"messages": messages}})


def test_the_dead_ups_flag_is_gone() -> None:
    # No code ever read it: a configuration that sets it is told so at start-up rather
    # than believing the node updates a UPS worklist.
    with pytest.raises(ValidationError, match="ups"):
        Settings.model_validate({"adapters": {"ups": True}})
