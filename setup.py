"""Build fastdiff's C++ (always) and CUDA (when possible) kernels.

    pip install torch                               # first: CPU or CUDA build
    pip install --no-build-isolation .              # then this package

CUDA kernels are built when torch is a CUDA build and nvcc is found (FASTDIFF_CUDA=1
forces it, FASTDIFF_CUDA=0 turns it off). Works with nvcc behind a wrapper script (the
real toolkit is found), without a visible GPU (TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0+PTX") and with the CUDA headers pip installs (site-packages/nvidia/cu13/include).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_nvcc(path):
    """Follow symlinks and `exec /real/nvcc "$@"` wrapper scripts to the real nvcc."""
    for _ in range(8):
        path = os.path.realpath(path)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return path
        if not head.startswith(b"#!"):
            return path
        m = re.search(rb"(/[^\s\"']+/bin/nvcc)\b", head)
        if m is None or m.group(1).decode() == path:
            return path
        path = m.group(1).decode()
    return path


def _find_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(_real_nvcc(nvcc)))


def _want_cuda(torch_mod, cuda_home):
    flag = os.environ.get("FASTDIFF_CUDA", "").strip()
    if flag == "0":
        return False
    available = torch_mod.version.cuda is not None and cuda_home is not None
    if flag == "1":
        if not available:
            sys.exit("FASTDIFF_CUDA=1 but torch is not a CUDA build or nvcc/CUDA_HOME was not "
                     f"found (torch.version.cuda={torch_mod.version.cuda}, CUDA_HOME={cuda_home})")
        return True
    return available


def _pip_cuda_includes():
    """Header dirs of the nvidia-* wheels a CUDA torch brings (cuBLAS etc. live there)."""
    dirs = []
    for p in sys.path:
        dirs += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(p, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


cuda_home = _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ.setdefault("CUDA_HOME", cuda_home)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = _want_cuda(torch, cuda_home)

sources = ["csrc/fastdiff.cpp", "csrc/program.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++20 from 2.14)
# -ffp-contract=off: the CPU kernels round like the PyTorch reference (no silent FMA).
cxx_flags += ["-ffp-contract=off"]
kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])

if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    kwargs["include_dirs"] += _pip_cuda_includes()
    ext = CUDAExtension(
        "fastdiff._C", sources,
        extra_compile_args={"cxx": cxx_flags + ["-DFASTDIFF_WITH_CUDA"],
                            "nvcc": ["-O3", "--fmad=false", "-DFASTDIFF_WITH_CUDA"]},
        **kwargs)
else:
    ext = CppExtension("fastdiff._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)

print(f"fastdiff: building {'CPU + CUDA' if with_cuda else 'CPU'} kernels "
      f"(torch {torch.__version__}, CUDA_HOME={os.environ.get('CUDA_HOME')}, "
      f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else '-'})")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
