"""The CUDA kernels themselves (csrc/cuda/*_kernel.cu), executed on the CPU.

No GPU is needed: tests/cuda_emu compiles the real kernel sources with the host compiler
against a small CUDA emulation (thread blocks as cooperative fibers that switch only at
__syncthreads and warp shuffles, launches, shared memory, half/bfloat16 conversions) and
calls their launchers on host buffers. Each result is compared with the pure-torch
reference of the op and with the C++ CPU kernel; outputs are poisoned with NaN and
surrounded by NaN guard zones, so an element a kernel forgets (a short tail) or writes out
of bounds shows up. Runs use the kernels' own launch grids, clamped grids (so the
grid-stride loops really stride) and both thread orders. The mutation tests at the end
plant a tail off-by-one and a missing __syncthreads into the sources and check that these
runs catch them.
"""
import ctypes
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "cuda_emu"))
import harness  # noqa: E402

from fastdiff import _ops  # noqa: E402
from fastdiff._ops import diff_norm_ref, embedding_ref, step_ref  # noqa: E402
from test_step_op import D_ROW_CASES, TOL, assert_d_row_outputs, d_row_case, make_case  # noqa: E402

needs_kernel = pytest.mark.usefixtures("compiled_kernels")
CODES = harness.dtype_codes()
DT = {torch.int64: "kI64", torch.int32: "kI32", torch.int16: "kI16", torch.int8: "kI8",
      torch.uint8: "kU8", torch.uint16: "kU16", torch.uint32: "kU32", torch.uint64: "kU64",
      torch.float16: "kF16", torch.bfloat16: "kBF16", torch.float32: "kF32", torch.float64: "kF64"}
GUARD = 67  # elements of NaN on each side of every output
# (max grid x, max grid y, reverse thread order): the kernels' own grids, then grids
# small enough that every grid-stride loop takes several trips.
GRIDS = [(0x7fffffff, 65535, False), (2, 2, True), (1, 1, False)]


@pytest.fixture(scope="module")
def emu():
    return harness.build()


def code(dtype):
    return CODES[DT[dtype]]


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)


class Guarded:
    """An output buffer of ``n`` elements with NaN guard zones and NaN contents."""

    def __init__(self, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        self.buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype)
        self.view = self.buf[GUARD:GUARD + n].view(shape)

    def check_guards(self):
        assert bool(self.buf[:GUARD].isnan().all()), "kernel wrote before its output"
        assert bool(self.buf[-GUARD:].isnan().all()), "kernel wrote past its output"


def run_step(emu, args, grid=GRIDS[0]):
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731  (as csrc/cuda/step.cpp)
    x, x_base, m, mc, noise, coeffs = map(c, (x, x_base, m, mc, noise, coeffs))
    hist = [h.contiguous() for h in hist]
    outs = [Guarded(x.shape, x.dtype) for _ in range(n_out)]
    hp = (ctypes.c_void_p * max(len(hist), 1))(*[h.data_ptr() for h in hist])
    op = (ctypes.c_void_p * n_out)(*[o.view.data_ptr() for o in outs])
    emu.emu_configure(grid[0], grid[1], 65535, int(grid[2]))
    B = x.shape[0]
    err = emu.emu_sampler_step(ptr(x), ptr(x_base), ptr(m), ptr(mc), ptr(noise), hp, len(hist), op,
                               n_out, ptr(coeffs), coeffs.shape[0], B, x.numel() // B, int(clamp),
                               code(x.dtype))
    assert err == 0, f"emulated launch failed: cudaError {err}"
    for o in outs:
        o.check_guards()
    return [o.view for o in outs]


STEP_CASES = [  # (shape, n_hist, n_out, cond, noise, x_base, clamp, per_sample)
    ((3, 3, 7, 5), 0, 1, False, False, False, False, True),
    ((5, 1001), 2, 2, True, True, False, False, True),     # tail of the last block
    ((1, 1, 1, 1), 1, 3, False, True, True, True, False),  # batch 1, one element
    ((2, 4, 33), 3, 4, True, False, True, True, True),     # 4 outputs in registers
    ((4, 257), 16, 5, True, True, True, False, True),      # one output at a time; max history
    ((3, 600), 1, 8, False, False, False, True, False),    # max outputs
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-h{c[1]}-o{c[2]}")
def test_step_kernel(emu, gen, dtype, case):
    shape, n_hist, n_out, cond, noise, x_base, clamp, per_sample = case
    args = make_case(gen, shape, dtype, n_hist=n_hist, n_out=n_out, cond=cond, noise=noise,
                     x_base=x_base, clamp=clamp, per_sample=per_sample, noncontig=True)
    ref = step_ref(*args)
    cpu = torch.ops.fastdiff.sampler_step(*args)
    for grid in GRIDS:
        got = run_step(emu, args, grid)
        for g, r, k in zip(got, ref, cpu):
            torch.testing.assert_close(g, r, **TOL[dtype])
            # Same per-element math (csrc/kernels/step.h), same rounding: bit-identical.
            assert torch.equal(g, k), f"grid {grid}: emulated CUDA differs from the C++ CPU kernel"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_step_kernel_output_selecting_d(emu, gen, dtype):
    # Outputs whose row selects d alone are d itself (Inf / NaN in the other terms, -0 d):
    # in registers (up to 4 outputs) and one output at a time (more).
    for case in D_ROW_CASES + [(1, 5, (1, 3), False, True, False, False)]:
        args = d_row_case(gen, (3, 45), dtype, *case)
        for grid in GRIDS[:2]:
            assert_d_row_outputs(run_step(emu, args, grid), step_ref(*args), case[2])


@needs_kernel
def test_step_kernel_aliasing_outputs(emu, gen):
    """sampler_step.out may write into its inputs: the register path loads every input of an
    element before storing any output of it."""
    args = make_case(gen, (3, 517), torch.float32, n_hist=2, n_out=3, cond=True, noise=True)
    x, x_base, m, mc, hist, noise, coeffs, clamp, n_out = args
    ref = step_ref(*args)
    x, m, hist = x.clone(), m.clone(), [h.clone() for h in hist]
    hp = (ctypes.c_void_p * 2)(*[h.data_ptr() for h in hist])
    op = (ctypes.c_void_p * 3)(x.data_ptr(), hist[0].data_ptr(), m.data_ptr())  # in place
    for grid in GRIDS[:2]:
        xs, ms, hs = x.clone(), m.clone(), [h.clone() for h in hist]
        hp = (ctypes.c_void_p * 2)(*[h.data_ptr() for h in hs])
        op = (ctypes.c_void_p * 3)(xs.data_ptr(), hs[0].data_ptr(), ms.data_ptr())
        emu.emu_configure(grid[0], grid[1], 65535, int(grid[2]))
        assert emu.emu_sampler_step(ptr(xs), None, ptr(ms), ptr(mc), ptr(noise), hp, 2, op, 3,
                                    ptr(coeffs), coeffs.shape[0], 3, 517, 0, code(torch.float32)) == 0
        for g, r in zip((xs, hs[0], ms), ref):
            torch.testing.assert_close(g, r, **TOL[torch.float32])


@needs_kernel
def test_step_kernel_empty_and_bad_arguments(emu, gen):
    counts = (ctypes.c_int64 * 3)()
    emu.emu_counters(counts)
    x = torch.empty(0, 5)
    op = (ctypes.c_void_p * 1)(None)
    coeffs = torch.randn(1, 20, generator=gen)
    assert emu.emu_sampler_step(ptr(x), None, ptr(x), None, None, None, 0, op, 1, ptr(coeffs), 1,
                                0, 5, 0, code(torch.float32)) == 0
    emu.emu_counters(counts)
    assert counts[0] == 0  # no launch for an empty batch (an empty grid is a CUDA error)
    bad = emu.emu_sampler_step(ptr(coeffs), None, ptr(coeffs), None, None, None, 0, op, 0,
                               ptr(coeffs), 1, 1, 20, 0, code(torch.float32))
    assert bad == 1  # n_out < 1: cudaErrorInvalidValue, nothing launched


def run_diff_norm(emu, a, b, grid=GRIDS[0]):
    a, b = a.contiguous(), b.contiguous()
    B = a.shape[0]
    S = a.numel() // B if B else 0
    nblk = -(-S // 4096) if S else 0
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = Guarded((B,), acc)
    part = Guarded((max(B * nblk, 1),), torch.float64)
    emu.emu_configure(0x7fffffff, grid[1], 65535, int(grid[2]))  # x indexes blocks: no stride
    err = emu.emu_diff_norm(ptr(a), ptr(b), code(a.dtype), B, S, ptr(part.view), ptr(out.view))
    assert err == 0, f"emulated launch failed: cudaError {err}"
    out.check_guards()
    part.check_guards()
    return out.view


def test_reduce_block_matches_header():
    """run_diff_norm sizes the workspace with the kernel's block; keep them equal."""
    text = (harness.CSRC / "kernels" / "reduce.h").read_text()
    assert "kBlock = 4096" in text.replace("  ", " ")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4096), (5, 9001), (1, 3, 70, 70), (7, 1)])
def test_diff_norm_kernel(emu, gen, dtype, shape):
    a = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype)
    ref = diff_norm_ref(a, b)
    cpu = torch.ops.fastdiff.diff_norm(a, b)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    for grid in GRIDS:
        got = run_diff_norm(emu, a, b, grid)
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(got, cpu, **tol)


@needs_kernel
def test_diff_norm_kernel_empty_rows(emu, gen):
    a = torch.randn(4, 0, generator=gen)
    assert torch.equal(run_diff_norm(emu, a, a.clone()), torch.zeros(4))


def run_embedding(emu, t, freqs, table, dim, flip, scale, width, end, derivative):
    t = t.contiguous()
    out = Guarded((t.shape[0], dim), freqs.dtype)
    rows = table.shape[0] if table is not None else 0
    err = emu.emu_timestep_embedding(ptr(t), code(t.dtype), ptr(freqs), ptr(table), rows, t.shape[0],
                                     dim, int(flip), scale, width, end, int(derivative),
                                     ptr(out.view), code(freqs.dtype))
    assert err == 0, f"emulated launch failed: cudaError {err}"
    out.check_guards()
    return out.view


def _times(dtype, B, gen):
    if dtype.is_floating_point:
        return (torch.rand(B, generator=gen, dtype=torch.float64) * 1200 - 100).to(dtype)
    hi = min(torch.iinfo(dtype).max, 1100)
    lo = max(torch.iinfo(dtype).min, -50)
    return torch.randint(lo, hi, (B,), generator=gen).to(dtype)


EMB_CASES = list(itertools.product(
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
     torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64],
    [(1, 7, False), (37, 320, True), (300, 33, False)],   # (B, dim, flip)
))


@needs_kernel
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("derivative", [False, True])
@pytest.mark.parametrize("t_dtype,bdf", EMB_CASES, ids=lambda v: str(v))
def test_embedding_kernel(emu, gen, out_dtype, derivative, t_dtype, bdf):
    B, dim, flip = bdf
    t = _times(t_dtype, B, gen)
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float64) * (9.21 / max(half, 1))).to(out_dtype)
    table = None
    width, end = (20.0, 100.0) if B > 1 else (0.0, 0.0)
    if not t_dtype.is_floating_point and B > 1:
        table = embedding_ref(torch.arange(500), freqs, None, dim, flip, 1.5, width, end, False)
    args = (t, freqs, table, dim, flip, 1.5, width, end, derivative)
    got = run_embedding(emu, *args)
    ref = embedding_ref(*args)
    cpu = torch.ops.fastdiff.timestep_embedding(*args)
    tol = dict(rtol=1e-12, atol=1e-12) if out_dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(got, cpu), "emulated CUDA differs from the C++ CPU kernel"


@needs_kernel
@pytest.mark.parametrize("t_dtype", [torch.int64, torch.uint64, torch.float32, torch.float64],
                         ids=str)
def test_embedding_kernel_large_arguments(emu, gen, t_dtype):
    # t * freq far beyond the fast sin/cos range (csrc/kernels/embedding.h), up to the
    # dtype's extremes: the device code takes the full range reduction, like the CPU.
    mag = 10.0 ** (torch.rand(40, generator=gen, dtype=torch.float64) * 12 + 6)
    if t_dtype.is_floating_point:
        t = torch.cat([mag, torch.tensor([1e30, -1e20])]).to(t_dtype)
    else:
        t = torch.cat([mag.to(torch.int64), torch.tensor([2 ** 63 - 1])]).to(t_dtype)
    out_dtype = torch.float64 if t_dtype == torch.float64 else torch.float32
    freqs = torch.exp(-torch.arange(16, dtype=torch.float64) * (9.21 / 16)).to(out_dtype)
    for derivative in ([False, True] if t_dtype.is_floating_point else [False]):
        args = (t, freqs, None, 32, True, 1.5, 0.0, 0.0, derivative)
        got = run_embedding(emu, *args)
        atol = 1e-14 if out_dtype == torch.float64 else 1.5 * 3e-7
        torch.testing.assert_close(got, embedding_ref(*args), atol=atol, rtol=0)
        assert torch.equal(got, torch.ops.fastdiff.timestep_embedding(*args))


# ---- mutation tests: the emulated runs above must catch real kernel bugs ----

@needs_kernel
def test_catches_tail_off_by_one_in_step(gen):
    bad = harness.build([("step_kernel.cu", "i < p.S;", "i < p.S - 1;")])
    args = make_case(gen, (3, 1001), torch.float32, n_hist=1, n_out=1)
    got = run_step(bad, args)[0]
    assert bool(got[:, -1].isnan().all()) and not bool(got[:, :-1].isnan().any())


@needs_kernel
def test_catches_out_of_bounds_tail_in_embedding(gen):
    bad = harness.build([("embedding_kernel.cu", "if (idx >= B * per_row) return;",
                          "if (idx > B * per_row) return;")])
    freqs = torch.rand(8, generator=gen)
    t = torch.rand(5, generator=gen) * 1000
    with pytest.raises(AssertionError, match="wrote past its output"):
        run_embedding(bad, t, freqs, None, 17, False, 1.0, 0.0, 0.0, False)


@needs_kernel
def test_catches_missing_block_barrier(gen):
    """block_sum's __syncthreads between the warps' partial sums and warp 0's final sum."""
    good_text = (harness.CSRC / "cuda" / "reduce_kernel.cu").read_text()
    assert good_text.count("__syncthreads();\n  v = threadIdx.x") == 1
    bad = harness.build([("reduce_kernel.cu", "__syncthreads();\n  v = threadIdx.x", "v = threadIdx.x")])
    a, b = torch.randn(3, 9000, generator=gen), torch.randn(3, 9000, generator=gen)
    got = run_diff_norm(bad, a, b, GRIDS[0])
    assert not torch.allclose(got, diff_norm_ref(a, b), rtol=1e-3)


@needs_kernel
def test_catches_missing_barrier_before_shared_reuse(gen):
    """The barrier at the end of each row: without it a warp that runs ahead overwrites its
    partial sum of the next row before warp 0 has read this row's (reverse thread order,
    several rows per block)."""
    mark = "__syncthreads();  // warp_sums is reused by the next row"
    bad = harness.build([("reduce_kernel.cu", mark, "")])
    a, b = torch.randn(6, 5000, generator=gen), torch.randn(6, 5000, generator=gen)
    got = run_diff_norm(bad, a, b, (0x7fffffff, 1, True))
    assert not torch.allclose(got, diff_norm_ref(a, b), rtol=1e-3)
    good = run_diff_norm(harness.build(), a, b, (0x7fffffff, 1, True))
    torch.testing.assert_close(good, diff_norm_ref(a, b), rtol=2e-6, atol=0)
