import os  # noqa: E401
# Shared pytest set-up. TRITON_INTERPRET=1 must be set before triton is imported so that
# the Triton kernels run on CPU tensors (interpreter mode) in the tests. On a GPU machine
# `make gpu-check` sets FASTDIFF_TRITON_INTERPRET=0 so that Triton compiles for the device.
if os.environ.get("FASTDIFF_TRITON_INTERPRET", "1") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_backend():
    """Route fastdiff's ops to the Triton kernels (interpreted on CPU) for one test."""
    from fastdiff import _ops
    old = _ops.get_backend()
    _ops.set_backend("triton")
    try:
        yield
    finally:
        _ops.set_backend(old)


@pytest.fixture
def compiled_kernels():
    """Fail (not skip) a kernel test when the compiled extension did not load."""
    from fastdiff import _ops
    assert _ops.HAS_EXTENSION, f"fastdiff._C is not built / did not load: {_ops._LOAD_ERROR}"


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny nets and tensors gain nothing from a second
    OpenMP thread, and on a busy 2-core machine its synchronisation made float64 matmuls
    up to ~1000x and training steps ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    """A freshly seeded generator: random inputs differ on every run (design rule); the
    seed is printed so that pytest shows it with a failure, for reproduction."""
    g = torch.Generator()
    seed = g.seed()
    print(f"generator seed: {seed}")
    return g


_triton_outcomes = {"passed": 0, "failed": 0, "skipped": 0}
_cuda_outcomes = {"passed": 0, "failed": 0, "skipped": 0}
_cuda_skip_reasons: set = set()


def pytest_runtest_logreport(report):
    if "cuda" in report.keywords and (report.when == "call" or report.outcome != "passed"):
        _cuda_outcomes[report.outcome] = _cuda_outcomes.get(report.outcome, 0) + 1
        if report.skipped and isinstance(report.longrepr, tuple):
            _cuda_skip_reasons.add(report.longrepr[2].removeprefix("Skipped: "))
        return
    # Tests that run a Triton kernel carry "triton" in their name (fixture triton_backend).
    if "triton" not in report.nodeid.lower():
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _triton_outcomes[report.outcome] = _triton_outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    """One line in the CI log saying the Triton kernels really ran (interpreted on CPU)."""
    c = _cuda_outcomes
    if sum(c.values()):
        why = f" ({'; '.join(sorted(_cuda_skip_reasons))})" if _cuda_skip_reasons else ""
        terminalreporter.write_line(
            f"CUDA device tests: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped{why}")
    o = _triton_outcomes
    if sum(o.values()):
        terminalreporter.write_line(
            f"Triton kernels, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}: "
            f"{o['passed']} tests passed, {o['failed']} failed, {o['skipped']} skipped")
