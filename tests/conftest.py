"""Fixtures: the cases of tests/helpers/cases.py crossed with every non-reference backend."""

import os

import pytest
import torch

# A bug inside a Taylor-mode rule raises instead of becoming a silent fallback.
os.environ.setdefault("HOS_STRICT", "1")

from hos.backends import BACKENDS, Backend
from tests.helpers.cases import CASES, build

#: Every backend under test: the registry minus the oracle itself, so a new
#: backend is checked against the oracle as soon as it is registered.
TESTED_BACKENDS = tuple(b.value for b in BACKENDS if b is not Backend.REFERENCE)


@pytest.fixture(params=[c.id for c in CASES])
def case(request):
    """A built case (model, twin, batch, partition, direction); shared, do not mutate."""
    return build(request.param)


@pytest.fixture(params=TESTED_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: the tensors are tiny and, on a shared machine,
    extra OpenMP threads only spin (10x slower convolutions were measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
