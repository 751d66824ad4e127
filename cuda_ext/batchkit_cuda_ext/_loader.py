"""Build-on-first-use and caching of the fused optimizer libraries.

The CPU twin is compiled with ``torch.utils.cpp_extension.load`` (ninja, file-locked, so
concurrent processes build it once) into a cache directory keyed by the source hash and the
torch version. The CUDA library is built the same way, only when torch itself has CUDA and a
device is present. Both are plain C ABIs opened with ctypes.

When a library cannot be built, callers get ``None`` and exactly one warning per library
saying why and what runs instead (the foreach path).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADER = CSRC / "bk_optim_math.h"
CPU_SOURCE = CSRC / "bk_optim_cpu.cpp"
CUDA_SOURCE = CSRC / "bk_optim_cuda.cu"

#: Set to "0" to disable the fused libraries entirely (the optimizers then use foreach).
DISABLE_ENV = "BATCHKIT_FUSED"
#: Overrides the cache directory of built libraries.
CACHE_ENV = "BATCHKIT_EXT_CACHE"

#: nvcc flags of every CUDA build (the loader's and nvcc_check's). --fmad=false: no fused
#: multiply-adds, so the kernels round exactly like the CPU twin (built with -ffp-contract=off).
CUDA_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}
_failures: dict[str, str] = {}


class FusedUnavailableWarning(UserWarning):
    """The fused kernels could not be used; the optimizer runs its foreach path."""


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchkit_cuda_ext"


def _cpu_features() -> str:
    """The CPU's feature flags: -march=native binaries must not be reused on another CPU type
    sharing the cache directory (e.g. a home directory on NFS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_name(kind: str, sources: list[Path], flags: dict) -> str:
    digest = hashlib.sha256()
    for path in [HEADER, *sources]:
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{platform.machine()}|{kind}|{sorted(flags.items())}".encode())
    if kind == "cpu":
        digest.update(_cpu_features().encode())
    return f"batchkit_optim_{kind}_{digest.hexdigest()[:12]}"


def _build(kind: str) -> ctypes.CDLL:
    from torch.utils.cpp_extension import load

    if kind == "cpu":
        sources = [CPU_SOURCE]
        # -fno-math-errno lets sqrtf vectorize; -march=native is safe because the build
        # is cached per machine (the cache key includes the architecture).
        extra = dict(
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
        )
        # developer knob for tuning experiments (part of the cache key like every flag)
        extra["extra_cflags"] += os.environ.get("BATCHKIT_EXT_EXTRA_CFLAGS", "").split()
    else:
        sources = [CUDA_SOURCE]
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        extra = dict(
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=[*CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        )
    name = _build_name(kind, sources, extra)
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    path = load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("BATCHKIT_EXT_VERBOSE") == "1",
        **extra,
    )
    return ctypes.CDLL(str(path))


def _reason_unavailable(kind: str) -> str | None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0 is set"
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "nvcc / CUDA_HOME was not found"
    return None


def get_library(kind: str) -> ctypes.CDLL | None:
    """The built library for ``kind`` ("cpu" or "cuda"), or None (one warning per kind)."""
    with _lock:
        if kind in _libraries:
            return _libraries[kind]
        reason = _reason_unavailable(kind)
        lib = None
        if reason is None:
            try:
                lib = _build(kind)
                from . import ops

                ops._check_abi(lib)
            except Exception as exc:  # a missing compiler shows up as many exception types
                reason = f"building the {kind} library failed: {type(exc).__name__}: {exc}".strip()
                lib = None
        _libraries[kind] = lib
        if lib is None:
            _failures[kind] = reason or "unknown"
            if os.environ.get(DISABLE_ENV, "1") != "0":
                warnings.warn(
                    f"batchkit-cuda-ext: fused {kind.upper()} LAMB/LARS kernels unavailable ({reason}); "
                    "using the torch._foreach path instead. Install a C++ compiler (CPU) or nvcc "
                    f"(CUDA), or pass impl='foreach' to silence this. Set {DISABLE_ENV}=0 to opt out.",
                    FusedUnavailableWarning,
                    stacklevel=3,
                )
        return lib


def failure_reason(kind: str) -> str | None:
    """Why ``get_library(kind)`` returned None, if it did."""
    return _failures.get(kind)


def _reset_for_tests() -> None:
    with _lock:
        _libraries.clear()
        _failures.clear()
