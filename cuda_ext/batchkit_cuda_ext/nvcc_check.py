"""Compile the CUDA sources with the machine's nvcc, without a GPU and without torch's CUDA headers.

    python -m batchkit_cuda_ext.nvcc_check            # sm_80 and sm_90, exit 0 on success

``make test`` runs this through ``cuda_ext/tests/test_nvcc_compile.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._loader import CSRC, CUDA_FLAGS, CUDA_SOURCE

DEFAULT_ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (Path("/usr/local/cuda/bin/nvcc"),):
        if candidate.exists():
            return str(candidate)
    return None


def compile_check(arch: str, out_dir: Path, nvcc: str | None = None) -> Path:
    """``nvcc -c`` of the CUDA kernels for one ``sm_<arch>``; returns the object file.

    Raises CalledProcessError with nvcc's output when compilation fails.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in /usr/local/cuda/bin")
    out = Path(out_dir) / f"bk_optim_cuda_sm{arch}.o"
    cmd = [nvcc, "-c", *CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xcompiler", "-fPIC", "-Werror", "all-warnings", f"-I{CSRC}", str(CUDA_SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    archs = (argv if argv else None) or list(DEFAULT_ARCHS)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            try:
                obj = compile_check(arch, Path(tmp))
            except subprocess.CalledProcessError as exc:
                print(f"sm_{arch}: FAILED\n{exc.stdout}{exc.stderr}", file=sys.stderr)
                return 1
            print(f"sm_{arch}: ok ({obj.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
