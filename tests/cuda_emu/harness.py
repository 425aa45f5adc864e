"""Build the real CUDA kernels (csrc/cuda/*_kernel.cu) with the host compiler against the
emulation in emu.h, and call their launchers from Python through ctypes.

The sources are used as they are, with one mechanical rewrite: each launch
``kernel<<<grid, block, shmem, stream>>>(args)`` becomes
``::emu::launch(::emu::Config(grid, block, shmem, stream), [&] { kernel(args); })``.
``build(mutations=...)`` applies text edits first (the mutation tests plant bugs that the
emulated runs must catch). Libraries are cached by a hash of their sources and flags.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
KERNELS = ("step_kernel.cu", "reduce_kernel.cu", "embedding_kernel.cu")
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-w"]


def rewrite_launches(src: str) -> str:
    """Replace every ``k<<<cfg>>>(args)`` by an emu::launch call (balanced parentheses,
    template arguments on the kernel name, line continuations inside macros kept)."""
    out, pos = [], 0
    while True:
        i = src.find("<<<", pos)
        if i < 0:
            out.append(src[pos:])
            return "".join(out)
        # The kernel expression ends right before <<<: identifier (with ::) and <...>.
        j = i
        if src[j - 1] == ">":
            depth = 0
            while True:
                j -= 1
                depth += {">": 1, "<": -1}.get(src[j], 0)
                if depth == 0:
                    break
        while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
            j -= 1
        k = src.index(">>>", i)
        cfg = src[i + 3:k]
        a = k + 3
        while src[a].isspace():
            a += 1
        if src[a] != "(":
            raise ValueError(f"launch without arguments at {src[j:a + 20]!r}")
        depth, b = 0, a
        while True:
            depth += {"(": 1, ")": -1}.get(src[b], 0)
            if depth == 0:
                break
            b += 1
        kernel, args = src[j:i], src[a + 1:b]
        out.append(src[pos:j])
        out.append(f"::emu::launch(::emu::Config({cfg}), [&] {{ {kernel}({args}); }})")
        pos = b + 1


def dtype_codes() -> dict:
    """DType enum of csrc/cuda/launchers.h: name (e.g. "kF32") -> value."""
    text = (CSRC / "cuda" / "launchers.h").read_text()
    body = re.search(r"enum class DType\s*:\s*int\s*\{([^}]*)\}", text).group(1)
    codes, v = {}, 0
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            item, val = (s.strip() for s in item.split("="))
            v = int(val, 0)
        codes[item] = v
        v += 1
    return codes


def build(mutations=()) -> ctypes.CDLL:
    """Compile the kernels (with ``mutations``: (file, old, new) text edits, each ``old``
    present exactly once) into a shared library and load it."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the CUDA emulation needs a host C++ compiler ({compiler!r} not found)")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "csrc"
        shutil.copytree(CSRC, tree)
        for name, old, new in mutations:
            p = tree / "cuda" / name
            text = p.read_text()
            if text.count(old) != 1:
                raise ValueError(f"mutation target must occur once in {name}: {old!r}")
            p.write_text(text.replace(old, new))
        units = []
        for name in KERNELS:
            p = tree / "cuda" / name
            p.write_text(rewrite_launches(p.read_text()))
            units.append(p)
        shutil.copy(HERE / "api.cpp", tree / "cuda" / "emu_api.cpp")
        units.append(tree / "cuda" / "emu_api.cpp")
        digest = hashlib.sha256()
        for f in sorted(tree.rglob("*")) + sorted(HERE.glob("*.h")) + sorted((HERE / "include").glob("*")):
            if f.is_file():
                digest.update(f.name.encode() + f.read_bytes())
        digest.update(" ".join([compiler] + FLAGS).encode())
        cache = Path(tempfile.gettempdir()) / "fastdiff-cuda-emu"
        cache.mkdir(exist_ok=True)
        lib = cache / f"emu-{digest.hexdigest()[:16]}.so"
        if not lib.exists():
            tmp_lib = cache / f".{lib.name}.{os.getpid()}.tmp"
            cmd = [compiler, *FLAGS, f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{tree / 'cuda'}",
                   "-x", "c++", *map(str, units), "-o", str(tmp_lib)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulated CUDA build failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
            os.replace(tmp_lib, lib)
    so = ctypes.CDLL(str(lib))
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.emu_sampler_step.argtypes = [vp, vp, vp, vp, vp, ctypes.POINTER(vp), i64, ctypes.POINTER(vp), i64,
                                    vp, i64, i64, i64, i32, i32]
    so.emu_diff_norm.argtypes = [vp, vp, i32, i64, i64, vp, vp]
    so.emu_timestep_embedding.argtypes = [vp, i32, vp, vp, i64, i64, i64, i32, ctypes.c_double,
                                          ctypes.c_double, ctypes.c_double, i32, vp, i32]
    so.emu_configure.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, i32]
    so.emu_counters.argtypes = [ctypes.POINTER(i64)]
    so.emu_configure(0x7fffffff, 65535, 65535, 0)
    return so
