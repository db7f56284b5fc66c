"""Model/training tests use one torch thread: the tensors are tiny, and on a shared 2-core
machine (a training run or other suites beside us) a second OpenMP thread only spins and
makes small ops tens of times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
