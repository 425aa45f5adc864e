"""Bad input at every public function of the op layer (embedding, schedules, wrappers,
backend selection, the raw ops and their Triton kernels): a table of calls and the
exception type and message fragment each must raise, before any work starts."""

import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule, TimeSharing, _ops
from fastdiff.embedding import SinusoidalEmbedding, embedding_frequencies, patch_time_embedding
from fastdiff.schedules import diffusers_timesteps, rescale_zero_terminal_snr
from fastdiff.triton.embedding import timestep_embedding as triton_embedding
from fastdiff.triton.reduce import diff_norm as triton_diff_norm
from fastdiff.triton.step import sampler_step as triton_step
from fastdiff.wrappers import ETSDM, etsdm, model_output

te = fastdiff.timestep_embedding
T4 = torch.arange(4)
F8 = embedding_frequencies(8)
LIN = NoiseSchedule.linear(T=100)
VP = NoiseSchedule.vp_linear()
X = torch.ones(2, 3)
COEFFS = torch.ones(2, _ops.STEP_HEAD + _ops.step_n_basis(0))


def _ident(x, t):
    return x


def _emb_op(**over):
    args = dict(t=T4, freqs=F8, table=None, dim=8, flip_sin_to_cos=False, scale=1.0,
                share_width=0.0, share_end=0.0, derivative=False)
    args.update(over)
    return lambda: torch.ops.fastdiff.timestep_embedding(*args.values())


def _triton_emb(**over):
    args = dict(t=T4, freqs=F8, table=None, dim=8, flip_sin_to_cos=False, scale=1.0,
                share_width=0.0, share_end=0.0, derivative=False)
    args.update(over)
    return lambda: triton_embedding(*args.values())


# (id, call, exception type, message fragment)
CASES = [
    # --- timestep_embedding -------------------------------------------------------------
    ("te/t-list", lambda: te([1, 2], 8), TypeError, "t must be a tensor of shape [B]"),
    ("te/t-str", lambda: te("1", 8), TypeError, "got str"),
    ("te/t-bool", lambda: te(True, 8), TypeError, "got bool"),
    ("te/t-2d", lambda: te(torch.zeros(2, 2), 8), ValueError, "t must have shape [B]"),
    ("te/t-bool-tensor", lambda: te(T4 > 1, 8), TypeError, "integer or floating"),
    ("te/t-complex", lambda: te(torch.zeros(2, dtype=torch.complex64), 8), TypeError,
     "integer or floating"),
    ("te/dim-0", lambda: te(T4, 0), ValueError, "dim must be a positive int, got 0"),
    ("te/dim-float", lambda: te(T4, 8.0), TypeError, "dim must be a positive int, got float"),
    ("te/dim-bool", lambda: te(T4, True), TypeError, "got bool"),
    ("te/dim-np-bool", lambda: te(T4, np.True_), TypeError, "got bool"),
    ("te/dim-str", lambda: te(T4, "8"), TypeError, "got str"),
    ("te/flip-str", lambda: te(T4, 8, flip_sin_to_cos="no"), TypeError,
     "flip_sin_to_cos must be a bool, got str"),
    ("te/flip-int", lambda: te(T4, 8, flip_sin_to_cos=1), TypeError, "must be a bool, got int"),
    ("te/shift-str", lambda: te(T4, 8, downscale_freq_shift="1"), TypeError,
     "downscale_freq_shift must be a real number"),
    ("te/shift-nan", lambda: te(T4, 8, downscale_freq_shift=math.nan), ValueError,
     "downscale_freq_shift must be finite"),
    ("te/shift-half", lambda: te(T4, 8, downscale_freq_shift=4), ValueError,
     "must differ from downscale_freq_shift"),
    ("te/scale-nan", lambda: te(T4, 8, scale=math.nan), ValueError, "scale must be finite"),
    ("te/scale-inf", lambda: te(T4, 8, scale=-math.inf), ValueError, "scale must be finite"),
    ("te/max_period-0", lambda: te(T4, 8, max_period=0), ValueError, "max_period must be > 0"),
    ("te/max_period-neg", lambda: te(T4, 8, max_period=-5.0), ValueError, "max_period must be > 0"),
    ("te/max_period-nan", lambda: te(T4, 8, max_period=math.nan), ValueError,
     "max_period must be finite"),
    ("te/max_period-str", lambda: te(T4, 8, max_period="1e4"), TypeError,
     "max_period must be a real number"),
    ("te/sharing-tuple", lambda: te(T4, 8, sharing=(100, 5)), TypeError,
     "sharing must be a fastdiff.TimeSharing or None"),
    # --- embedding_frequencies, SinusoidalEmbedding, patch_time_embedding ----------------
    ("freqs/dim-0", lambda: embedding_frequencies(0), ValueError, "dim must be a positive int"),
    ("freqs/max_period-0", lambda: embedding_frequencies(8, max_period=0), ValueError,
     "max_period must be > 0"),
    ("freqs/shift-half", lambda: embedding_frequencies(8, downscale_freq_shift=4), ValueError,
     "must differ"),
    ("freqs/dtype-int", lambda: embedding_frequencies(8, dtype=torch.int64), TypeError,
     "dtype must be a floating torch.dtype"),
    ("module/dim-0", lambda: SinusoidalEmbedding(0), ValueError, "dim must be a positive int"),
    ("module/flip-str", lambda: SinusoidalEmbedding(8, flip_sin_to_cos="yes"), TypeError,
     "flip_sin_to_cos must be a bool"),
    ("module/max_period-0", lambda: SinusoidalEmbedding(8, max_period=0), ValueError,
     "max_period must be > 0"),
    ("module/sharing-int", lambda: SinusoidalEmbedding(8, sharing=5), TypeError,
     "sharing must be a fastdiff.TimeSharing"),
    ("patch/no-time_proj", lambda: patch_time_embedding(torch.nn.Linear(2, 2)), TypeError,
     "has no `time_proj`"),
    # --- TimeSharing ---------------------------------------------------------------------
    ("sharing/n-float", lambda: TimeSharing(100, 5.0), TypeError, "n must be an int, got float"),
    ("sharing/n-bool", lambda: TimeSharing(100, True), TypeError, "n must be an int, got bool"),
    ("sharing/n-0", lambda: TimeSharing(100, 0), ValueError, "n must be >= 1"),
    ("sharing/t_tilde-str", lambda: TimeSharing("100", 5), TypeError, "t_tilde must be a number"),
    ("sharing/t_tilde-bool", lambda: TimeSharing(True, 1), TypeError, "t_tilde must be a number"),
    ("sharing/t_tilde-0", lambda: TimeSharing(0, 5), ValueError, "positive finite"),
    ("sharing/t_tilde-inf", lambda: TimeSharing(math.inf, 5), ValueError, "positive finite"),
    ("sharing/t_tilde-nan", lambda: TimeSharing(math.nan, 5), ValueError, "positive finite"),
    ("sharing/n-above-t_tilde", lambda: TimeSharing(10, 20), ValueError, "n <= t_tilde"),
    ("sharing/not-divisible", lambda: TimeSharing(100, 3), ValueError, "divisible"),
    ("sharing/call-str", lambda: TimeSharing()("5"), TypeError, "t must be a number or a tensor"),
    ("sharing/call-bool", lambda: TimeSharing()(torch.tensor([True])), TypeError,
     "integer or floating"),
    # --- wrappers ------------------------------------------------------------------------
    ("etsdm/model-int", lambda: etsdm(5), TypeError, "model must be callable"),
    ("etsdm/t_tilde-neg", lambda: etsdm(_ident, t_tilde=-1), ValueError, "positive finite"),
    ("etsdm/n-0", lambda: etsdm(_ident, n=0), ValueError, "n must be >= 1"),
    ("ETSDM/sharing-int", lambda: ETSDM(_ident, 5), TypeError,
     "sharing must be a fastdiff.TimeSharing"),
    ("etsdm/no-time-argument", lambda: etsdm(lambda x: x)(X), TypeError, "no time argument"),
    ("model_output/int", lambda: model_output(5), TypeError, "expected a tensor"),
    ("model_output/none", lambda: model_output(None), TypeError, "returned NoneType"),
    # --- backend selection ---------------------------------------------------------------
    ("set_backend/name", lambda: _ops.set_backend("cuda"), ValueError, "backend must be one of"),
    # --- NoiseSchedule constructors -------------------------------------------------------
    ("linear/T-0", lambda: NoiseSchedule.linear(T=0), ValueError, "T must be >= 1"),
    ("linear/T-float", lambda: NoiseSchedule.linear(T=10.0), TypeError, "T must be an int"),
    ("linear/T-bool", lambda: NoiseSchedule.linear(T=True), TypeError, "got bool"),
    ("linear/beta_end-nan", lambda: NoiseSchedule.linear(beta_end=math.nan), ValueError,
     "beta_end must be finite"),
    ("linear/beta_end-above-1", lambda: NoiseSchedule.linear(beta_end=1.5), ValueError,
     "betas must lie in (0, 1)"),
    ("linear/rescale-str", lambda: NoiseSchedule.linear(rescale_zero_terminal_snr="no"),
     TypeError, "rescale_zero_terminal_snr must be a bool"),
    ("scaled_linear/beta_start-neg", lambda: NoiseSchedule.scaled_linear(beta_start=-1),
     ValueError, "beta_start, beta_end >= 0"),
    ("cosine/max_beta-1.5", lambda: NoiseSchedule.cosine(max_beta=1.5), ValueError,
     "max_beta must lie in (0, 1]"),
    ("cosine/max_beta-0", lambda: NoiseSchedule.cosine(max_beta=0), ValueError,
     "max_beta must lie in (0, 1]"),
    ("cosine/max_beta-nan", lambda: NoiseSchedule.cosine(max_beta=math.nan), ValueError,
     "max_beta must be finite"),
    ("from_betas/strings", lambda: NoiseSchedule.from_betas(["a"]), TypeError,
     "only real numbers"),
    ("from_betas/empty", lambda: NoiseSchedule.from_betas([]), ValueError, "empty betas"),
    ("from_betas/2d", lambda: NoiseSchedule.from_betas(torch.rand(2, 2)), ValueError,
     "must be 1-D"),
    ("from_betas/int", lambda: NoiseSchedule.from_betas(torch.ones(3, dtype=torch.long)),
     TypeError, "floating-point tensor"),
    ("from_betas/nan", lambda: NoiseSchedule.from_betas([0.1, math.nan]), ValueError,
     "betas must be finite"),
    ("from_betas/zero", lambda: NoiseSchedule.from_betas([0.0, 0.1]), ValueError,
     "betas must lie in (0, 1)"),
    ("from_alphas_cumprod/increasing", lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.95]),
     ValueError, "strictly decreasing"),
    ("from_alphas_cumprod/first-1", lambda: NoiseSchedule.from_alphas_cumprod([1.0, 0.5]),
     ValueError, "alphas_cumprod[0] must lie in (0, 1)"),
    ("from_diffusers/int", lambda: NoiseSchedule.from_diffusers(5), TypeError,
     "expects a diffusers scheduler"),
    ("from_diffusers/empty", lambda: NoiseSchedule.from_diffusers({}), ValueError,
     "neither beta_schedule nor trained_betas"),
    ("vp_linear/beta_1-0", lambda: NoiseSchedule.vp_linear(beta_1=0), ValueError,
     "beta_1 > 0"),
    ("vp_cosine/t_max", lambda: NoiseSchedule.vp_cosine(t_max=1.5), ValueError,
     "t_max in (0, 1)"),
    ("from_dict/int", lambda: NoiseSchedule.from_dict(5), TypeError, "expects a dict"),
    ("from_dict/missing", lambda: NoiseSchedule.from_dict({"kind": "x"}), ValueError,
     "missing keys"),
    # --- NoiseSchedule methods -----------------------------------------------------------
    ("alpha/str", lambda: LIN.alpha("1"), TypeError, "t must be a number"),
    ("alpha/bool", lambda: LIN.alpha(True), TypeError, "got bool"),
    ("alpha/out-of-range", lambda: LIN.alpha(100), ValueError, "must lie in [0, 99]"),
    ("alpha/nan", lambda: LIN.alpha(math.nan), ValueError, "contains NaN"),
    ("alpha/continuous-range", lambda: VP.alpha(1.5), ValueError, "must lie in [0.0, 1.0]"),
    ("lambda_/complex", lambda: LIN.lambda_(torch.tensor([1j])), TypeError, "must be real"),
    ("timesteps/0", lambda: LIN.timesteps(0), ValueError, "steps must be in [1, 100]"),
    ("timesteps/spacing", lambda: LIN.timesteps(10, spacing="x"), ValueError,
     "spacing must be one of"),
    ("timesteps/continuous", lambda: VP.timesteps(10), ValueError, "needs a discrete schedule"),
    ("time_uniform/t_start", lambda: VP.time_uniform(10, t_start=2), ValueError,
     "t_start must lie in (0, 1]"),
    ("karras_sigmas/order", lambda: LIN.karras_sigmas(10, sigma_min=5, sigma_max=1),
     ValueError, "sigma_max must exceed sigma_min"),
    ("karras_sigmas/rho-nan", lambda: LIN.karras_sigmas(10, rho=math.nan), ValueError,
     "rho must be finite"),
    ("sigma_to_t/str", lambda: LIN.sigma_to_t("a"), TypeError, "sigmas must be a number"),
    ("diffusers_timesteps/T-0", lambda: diffusers_timesteps(0, 1), ValueError, "T must be >= 1"),
    ("diffusers_timesteps/flavor", lambda: diffusers_timesteps(10, 5, flavor="x"), ValueError,
     "flavor must be one of"),
    ("diffusers_timesteps/offset", lambda: diffusers_timesteps(10, 5, steps_offset=-1),
     ValueError, "steps_offset must be >= 0"),
    ("rescale/list", lambda: rescale_zero_terminal_snr([0.1, 0.2]), TypeError,
     "floating-point tensor"),
    ("rescale/T-1", lambda: rescale_zero_terminal_snr(torch.tensor([0.1])), ValueError,
     "T >= 2"),
    ("grid/lambda_min_clipped-nan",
     lambda: fastdiff.Sampler("dpm++2m", steps=10, lambda_min_clipped=math.nan), ValueError,
     "lambda_min_clipped must be a log-SNR or -inf"),
    ("grid/lambda_min_clipped-str",
     lambda: fastdiff.Sampler("dpm++2m", steps=10, lambda_min_clipped="a"), TypeError,
     "lambda_min_clipped must be a real number"),
    # --- raw ops (C++ checks raise RuntimeError) -----------------------------------------
    ("op/embedding-freqs", _emb_op(freqs=F8[:3]), RuntimeError, "freqs must have shape"),
    ("op/embedding-freqs-half", _emb_op(freqs=F8.half()), RuntimeError, "float32 or float64"),
    ("op/embedding-table", _emb_op(table=torch.zeros(3, 7)), RuntimeError,
     "table must have shape"),
    ("op/embedding-t-2d", _emb_op(t=T4[None]), RuntimeError, "t must have shape [B]"),
    ("op/embedding-t-bool", _emb_op(t=T4 > 0), RuntimeError, "integer or floating"),
    ("op/embedding-share", _emb_op(share_end=100.0), RuntimeError, "share_width must be > 0"),
    ("op/step-int", lambda: torch.ops.fastdiff.sampler_step(
        X.long(), None, X.long(), None, [], None, COEFFS, False, 1), RuntimeError,
     "x must be float32"),
    ("op/step-coeffs", lambda: torch.ops.fastdiff.sampler_step(
        X, None, X, None, [], None, COEFFS[:, :3], False, 1), RuntimeError,
     "coeffs must have shape"),
    ("op/step-n_out", lambda: torch.ops.fastdiff.sampler_step(
        X, None, X, None, [], None, COEFFS, False, 0), RuntimeError, "n_out must be >= 1"),
    ("op/diff_norm-shape", lambda: torch.ops.fastdiff.diff_norm(X, X[:1]), RuntimeError,
     "but b has shape"),
    ("op/diff_norm-int", lambda: torch.ops.fastdiff.diff_norm(X.long(), X.long()),
     RuntimeError, "float32"),
    # --- Triton kernels (interpreted on CPU) ---------------------------------------------
    ("triton/embedding-freqs", _triton_emb(freqs=F8[:3]), ValueError, "freqs must have shape"),
    ("triton/embedding-t-2d", _triton_emb(t=T4[None]), ValueError, "shape [B]"),
    ("triton/embedding-share", _triton_emb(share_end=100.0), ValueError,
     "share_width must be > 0"),
    ("triton/step-coeffs", lambda: triton_step(X, None, X, None, [], None, COEFFS[:, :3], False,
                                               1), ValueError, "coeffs must have shape"),
    ("triton/step-dtype", lambda: triton_step(X, None, X.double(), None, [], None, COEFFS, False,
                                              1), TypeError, "expected x's dtype"),
    ("triton/diff_norm-shape", lambda: triton_diff_norm(X, X[:1]), ValueError, "but b has shape"),
]


@pytest.mark.parametrize("call,exc,fragment", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value), str(info.value)


# The row-id prefix that covers each public name of the op-layer modules.
COVERS = {"timestep_embedding": "te", "embedding_frequencies": "freqs",
          "SinusoidalEmbedding": "module", "patch_time_embedding": "patch",
          "TimeSharing": "sharing", "etsdm": "etsdm", "ETSDM": "ETSDM",
          "model_output": "model_output", "set_backend": "set_backend",
          "NoiseSchedule": "linear", "diffusers_timesteps": "diffusers_timesteps",
          "rescale_zero_terminal_snr": "rescale"}


def test_every_public_function_is_covered():
    """A public function added to these modules without a row here fails this test."""
    from fastdiff import embedding, schedules, wrappers
    public = {"set_backend"} | set(embedding.__all__) | set(wrappers.__all__)
    public |= set(schedules.__all__)
    ids = {c[0].split("/")[0] for c in CASES}
    assert public <= set(COVERS), public - set(COVERS)
    assert {COVERS[n] for n in public} <= ids
