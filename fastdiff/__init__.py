"""fastdiff: fused C++/CUDA/Triton kernels for diffusion models.

E-TSDM time sharing, fused sampler steps, Lipschitz probes and SingDiffusion behind a
thin API that drops into an existing PyTorch UNet.
"""
from ._ops import backends, get_backend, set_backend
from .embedding import SinusoidalEmbedding, patch_time_embedding, timestep_embedding
from .schedules import NoiseSchedule, TimeSharing
from .wrappers import ETSDM, etsdm
from .probes import LipschitzResult, lipschitz_t, lipschitz_x
from .samplers import SAMPLERS, Sampler, invert, sample
from .nets import UNet
from .pretrained import pretrained
from .model_io import load_model, save_model
from .train import diffusion_loss

__version__ = "0.1.0"

_LAZY = {"FusedScheduler": "fastdiff.integrations.diffusers", "fuse": "fastdiff.integrations.diffusers"}


def __getattr__(name):
    # diffusers is imported only when its integration is first used.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = ["backends", "get_backend", "set_backend", "timestep_embedding",
           "SinusoidalEmbedding", "patch_time_embedding", "NoiseSchedule", "TimeSharing", "ETSDM", "etsdm",
           "lipschitz_t", "lipschitz_x", "LipschitzResult", "sample", "invert", "Sampler", "SAMPLERS",
           "UNet", "pretrained", "load_model", "save_model", "diffusion_loss", "FusedScheduler", "fuse",
           "__version__"]
