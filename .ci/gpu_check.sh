#!/usr/bin/env bash
# One command for a freshly lent GPU machine: build fastdiff against the machine's CUDA
# torch, run the CUDA / Triton tests, run the GPU benchmarks, and leave everything in one
# folder. Usage (from the repository root):
#
#   make gpu-wheels            # once, on a machine with PyPI: wheels the GPU machine lacks
#   make gpu-check             # on the GPU machine (QUICK=1: a short version, < 3 min)
#
# Output folder: $GPU_CHECK_OUT, else $OUT (the device tool's return folder), else
# out/gpu-check. It gets env.txt, build.log, pytest.log (+ junit XML), one JSON and one log
# per benchmark, and summary.txt (one line per step: ok / FAILED, seconds). The exit status
# is non-zero when any step failed; without a GPU the CUDA steps fail at once with the
# reason (nothing waits or hangs: every step runs under a time limit).
set -uo pipefail
cd "$(dirname "$0")/.."

quick=${QUICK:-0}
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    *) echo "gpu_check.sh: unknown argument $a (expected --quick)" >&2; exit 2 ;;
  esac
done
out=${GPU_CHECK_OUT:-${OUT:-out/gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
jobs=${MAX_JOBS:-$(nproc)}
summary="$out/summary.txt"
: > "$summary"
failed=0
start_all=$(date +%s)

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $out/NAME.log, record status.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    printf '%-22s ok      %4ds\n' "$name" "$dt" >> "$summary"
  else
    [ $rc -eq 124 ] && why="timed out" || why="exit $rc"
    printf '%-22s FAILED  %4ds  (%s; see %s.log)\n' "$name" "$dt" "$why" "$name" >> "$summary"
    failed=1
  fi
  return $rc
}

# -- 0. what machine this is --------------------------------------------------------------
{
  echo "date: $(date -u)"; echo "python: $($py --version 2>&1) ($py)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  $py - <<'PY'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
gpu=$($py -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
cap=$($py -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || echo "")

# -- 1. what the GPU machine's Python lacks (diffusers, ninja, setuptools): from .whl/ ----
missing=$($py - <<'PY'
import importlib.util as u
print(" ".join(m for m in ("diffusers", "ninja", "setuptools", "wheel") if u.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -d .whl ]; then
    step wheels 300 $py -m pip install --no-index --find-links .whl $missing
  else
    echo "missing on this machine: $missing, and no .whl/ folder (run 'make gpu-wheels' where PyPI is reachable)"
    printf '%-22s FAILED     0s  (missing %s; no .whl/)\n' wheels "$missing" >> "$summary"
    failed=1
  fi
fi

# -- 2. build against this machine's torch ------------------------------------------------
if [ "$gpu" = 1 ]; then
  # Only this device's architecture: a fraction of the default fat build's compile time.
  step build 600 env FASTDIFF_CUDA=1 MAX_JOBS="$jobs" TORCH_CUDA_ARCH_LIST="$cap" \
    $py -m pip install --no-build-isolation --no-deps -e .
  step build-check 120 $py -c "
import fastdiff
b = fastdiff.backends()
print(b)
assert b['cuda_kernels'], 'the CUDA kernels did not build / register'
assert b['cuda_device'], 'no CUDA device visible'
"
else
  echo "no CUDA device: not building the CUDA kernels (torch.cuda.is_available() is False)"
  printf '%-22s FAILED     0s  (no CUDA device: torch.cuda.is_available() is False)\n' build >> "$summary"
  failed=1
fi

# -- 3. tests: the CUDA device tests with Triton compiled for the device, and the emulated
#       CUDA kernels (which need only the host compiler) ------------------------------------
tests=(tests/test_device_cuda.py tests/test_cuda_emulated.py)
sel=()
[ "$quick" = 1 ] && sel=(-k "not 2_31 and not float64 and not noncontig-True and not probes")
step pytest $(( quick == 1 ? 240 : 420 )) env FASTDIFF_TRITON_INTERPRET=0 \
  $py -m pytest -q -p no:cacheprovider "${tests[@]}" "${sel[@]}" --junitxml "$out/pytest.xml" -rs
# A CUDA run where nothing ran on the device is a failure, whatever pytest said.
if ! grep -Eq "CUDA device tests: [1-9][0-9]* passed" "$out/pytest.log"; then
  echo "no CUDA device test ran ($(grep -E 'CUDA device tests:' "$out/pytest.log" || echo 'none collected'))"
  printf '%-22s FAILED     0s  (no CUDA device test ran)\n' cuda-tests >> "$summary"
  failed=1
fi

# -- 4. GPU benchmarks (each writes a JSON) ------------------------------------------------
if [ "$gpu" = 1 ]; then b_quick=$([ "$quick" = 1 ] && echo --quick); else b_quick=--quick; fi
step bench_step $(( quick == 1 ? 120 : 300 )) $py benchmarks/bench_step.py --device cuda $b_quick \
  --json "$out/bench_step.json"
step bench_sample $(( quick == 1 ? 120 : 300 )) $py benchmarks/bench_sample.py --device cuda \
  --repeats $([ "$quick" = 1 ] && echo 3 || echo 7) --json "$out/bench_sample.json"
step bench_embedding $(( quick == 1 ? 120 : 300 )) $py benchmarks/bench_embedding.py --device cuda \
  --no-progress $b_quick --json "$out/bench_embedding.json"
if [ "$quick" = 1 ]; then probe=(--timesteps 100 --samples 8 --chunk-repeats 3); else probe=(--timesteps 1000 --samples 16); fi
step bench_probe $(( quick == 1 ? 120 : 300 )) $py benchmarks/bench_probe.py --device cuda "${probe[@]}" \
  --json "$out/bench_probe.json"

# -- summary -------------------------------------------------------------------------------
echo "total $(( $(date +%s) - start_all ))s; quick=$quick" >> "$summary"
echo "=== summary ($out)"
cat "$summary"
if [ $failed -ne 0 ]; then
  echo "gpu-check FAILED (see the lines above; logs in $out)"
  exit 1
fi
echo "gpu-check passed"
