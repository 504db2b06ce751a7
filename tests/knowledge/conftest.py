"""Fixtures shared by the knowledge tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Training-loop tests on tiny tables: one thread. Two OpenMP threads gain nothing on such
    tensors, and on a loaded machine their spinning made one of these tests 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
