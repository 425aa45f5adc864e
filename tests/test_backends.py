"""Backend reporting, the no-extension fallback, and the self-check."""
import subprocess
import sys
import textwrap

import torch

import fastdiff
from fastdiff import _ops


def test_backends_report():
    b = fastdiff.backends()
    assert set(b) >= {"cpu_kernels", "cuda_kernels", "triton", "backend", "torch"}
    assert b["cpu_kernels"] is True, f"extension failed to load: {b['load_error']}"
    for name in _ops.SCHEMAS:
        assert _ops.has_kernel(name, "cpu"), f"fastdiff::{name} has no CPU kernel"


def test_test_dependencies_present():
    # The suite needs the [test] extra (as `make test` and CI install it); a missing
    # package is named here rather than as a collection error elsewhere.
    import importlib.util
    for mod in ("triton", "diffusers", "scipy", "sklearn", "matplotlib", "hypothesis"):
        assert importlib.util.find_spec(mod) is not None, (
            f"{mod} is missing: install the test extra (pip install -e '.[test]')")
    assert fastdiff.backends()["triton"]


def test_schemas_match_extension():
    # The fallback schemas in _ops.py must stay identical to csrc/fastdiff.cpp.
    for name, schema in _ops.SCHEMAS.items():
        registered = str(_ops.op(name)._schema)
        assert registered == "fastdiff::" + schema, (registered, schema)


def test_selfcheck_passes():
    from fastdiff.selfcheck import selfcheck
    assert selfcheck(verbose=False)


def test_missing_extension_falls_back_to_reference():
    # Block the compiled module: fastdiff must import, warn once, and still compute.
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fastdiff._C"] = None
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastdiff
        msgs = [str(x.message) for x in w if "compiled extension" in str(x.message)]
        assert len(msgs) == 1, msgs
        import torch
        from diffusers.models.embeddings import get_timestep_embedding
        assert fastdiff.backends()["cpu_kernels"] is False
        t = torch.randint(0, 1000, (9,))
        err = (fastdiff.timestep_embedding(t, 64) - get_timestep_embedding(t, 64)).abs().max()
        assert err <= 1e-6, err
        print("fallback ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fallback ok" in r.stdout


def test_set_backend_validates():
    import pytest
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdiff.set_backend("cudnn")


def test_public_api():
    # The names the README and the issues promise at the top level.
    for name in ("NoiseSchedule", "TimeSharing", "timestep_embedding", "patch_time_embedding",
                 "etsdm", "sample", "Sampler", "SAMPLERS", "lipschitz_t", "lipschitz_x",
                 "LipschitzResult", "pretrained", "UNet", "diffusion_loss", "backends"):
        assert hasattr(fastdiff, name), name
        assert name in fastdiff.__all__, name
