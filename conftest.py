# pytest configuration shared by every test_*.py.
import os
import random

# The Triton kernels are tested on CPU tensors through Triton's interpreter when there is no GPU. The flag is read
# when a @triton.jit function is defined, so it must be set before anything imports kernels/.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def set_seed():
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    yield


def pytest_configure(config):
    # `python -m pytest -q -m "not slow"`: quick feedback (~3 minutes); the README's command runs everything
    config.addinivalue_line("markers", "slow: a long end-to-end test (a real model trained, a server, a compile)")
