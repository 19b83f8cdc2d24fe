"""One intra-op thread for the tiny-model tests: on a shared 2-core machine two OpenMP
threads spin against other processes and make these small ops several times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
