#!/usr/bin/env bash
# Build fastdiff with its CUDA kernels against the CUDA build of torch in a separate venv,
# import it and assert that every op has a CUDA kernel registered. No GPU is needed.
# Usage: .ci/cuda_check.sh [VENV_DIR] [TORCH_SPEC]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-cuda}
torch_spec=${2:-torch==2.14.1}
python3=${PYTHON:-python3}

test -x "$venv/bin/python" || "$python3" -m venv "$venv"
venv=$(cd "$venv" && pwd)  # absolute: the import check below runs from another folder
"$venv/bin/pip" install -q --upgrade pip setuptools wheel ninja pybind11 numpy
"$venv/bin/pip" install -q "$torch_spec"
"$venv/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Build from a pristine copy so the CPU build's objects (another torch) are never reused.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$src"/ 2>/dev/null || cp -r setup.py pyproject.toml README.md csrc fastdiff "$src"/
rm -f "$src"/fastdiff/_C*.so
FASTDIFF_CUDA=1 "$venv/bin/pip" install -v --no-build-isolation --no-deps "$src" 2>&1 \
  | grep -E "fastdiff: building|nvcc|\.cu|Successfully|error" | sed -e 's/^ *//' | cut -c1-240

cd /tmp
"$venv/bin/python" - <<'PY'
import os
import torch
import fastdiff
from fastdiff import _ops
so = fastdiff._ops._C.__file__
print("extension:", so, f"({os.path.getsize(so) / 1e6:.1f} MB)")
missing = [n for n in _ops.SCHEMAS if not _ops._has_cuda_kernel(n)]
for n in _ops.SCHEMAS:
    why = " (by design: the reference serves CUDA tensors)" if n in _ops.NO_CUDA_KERNEL else ""
    print(f"  fastdiff::{n:<20} CUDA kernel registered: {n not in missing}{why}")
unexpected = [n for n in missing if n not in _ops.NO_CUDA_KERNEL]
assert not unexpected, f"ops without a CUDA kernel: {unexpected}"
assert fastdiff.backends()["cuda_kernels"]
# The CPU kernels of the CUDA build still agree with the references.
from fastdiff.selfcheck import selfcheck
assert selfcheck(verbose=True)
print("CUDA build check passed")
PY
