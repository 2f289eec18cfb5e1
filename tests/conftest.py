"""Test environment: Triton's CPU interpreter, one torch thread per xdist worker, hypothesis profile,
and a fixed seed per test. Shared helpers live in ``helpers.py`` (``from helpers import ...``)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter. The variable is read when a kernel is decorated,
    # so it must be set before any test module (or gqa itself) imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
