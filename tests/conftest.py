import os; os.environ["TRITON_INTERPRET"] = "1"  # noqa: E401,E702  (before anything imports triton)
# Shared pytest set-up. TRITON_INTERPRET=1 must be set before triton is imported so that
# the Triton kernels run on CPU tensors (interpreter mode) in the tests.

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_backend():
    """Route fastdiff's ops to the Triton kernels (interpreted on CPU) for one test."""
    pytest.importorskip("triton")
    from fastdiff import _ops
    old = _ops.get_backend()
    _ops.set_backend("triton")
    try:
        yield
    finally:
        _ops.set_backend(old)


@pytest.fixture
def gen():
    """A freshly seeded generator: random inputs differ on every run (design rule); the
    seed is printed so that pytest shows it with a failure, for reproduction."""
    g = torch.Generator()
    seed = g.seed()
    print(f"generator seed: {seed}")
    return g
