"""The CUDA kernels compile with the machine's nvcc for sm_80 and sm_90, without a GPU and
without torch's CUDA headers (the CPU torch wheel has none). `make test` runs this."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from batchkit_cuda_ext import nvcc_check

NVCC = nvcc_check.find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin): cannot check the CUDA build")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_sources_compile(arch, tmp_path):
    try:
        obj = nvcc_check.compile_check(arch, tmp_path, NVCC)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"nvcc failed for sm_{arch}:\n{exc.stdout}\n{exc.stderr}")
    assert obj.stat().st_size > 10_000
    # the object really holds device code for the requested architecture
    cuobjdump = shutil.which("cuobjdump") or next(
        (str(p) for p in [Path("/usr/local/cuda/bin/cuobjdump")] if p.exists()), None)
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True)
        assert f"sm_{arch}" in listing.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_compile_check_reports_broken_sources(tmp_path, monkeypatch):
    """The check can fail: a source with a device-side error is reported, not ignored."""
    broken = tmp_path / "broken.cu"
    broken.write_text('#include "bk_optim_math.h"\n__global__ void k(float* x) { x[0] = bk::undefined_fn(); }\n')
    monkeypatch.setattr(nvcc_check, "CUDA_SOURCE", broken)
    with pytest.raises(subprocess.CalledProcessError):
        nvcc_check.compile_check("80", tmp_path, NVCC)


def test_cuda_source_includes_no_torch_header():
    text = nvcc_check.CUDA_SOURCE.read_text() + (nvcc_check.CSRC / "bk_optim_math.h").read_text()
    includes = [line for line in text.splitlines() if line.strip().startswith("#include")]
    assert includes and not any("torch" in line or "ATen" in line or "c10" in line for line in includes)
