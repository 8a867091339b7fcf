"""Every `.cu` file of the `cuda` backend compiles with nvcc for sm_80 and sm_90, with exactly the
template instantiations the backend asks NVRTC for: a syntax or type error fails CI (which has
nvcc and no GPU) instead of a user's first call."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flashdispatch.backends import cuda

ARCHS = ("sm_80", "sm_90")


def _instantiations() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {"forward.cu": [], "decode.cu": []}
    for dtype in cuda.SUPPORT.dtypes:
        for head_dim in range(cuda.SUPPORT.min_head_dim, cuda.SUPPORT.max_head_dim + 1, cuda.SUPPORT.head_dim_multiple):
            names["forward.cu"] += cuda.forward_kernels(dtype, head_dim)
            names["decode.cu"] += cuda.decode_kernels(dtype, head_dim)
    return names


def test_every_kernel_source_is_listed():
    sources = sorted(p.name for p in cuda.KERNELS.glob("*.cu"))
    assert sources == sorted(_instantiations())


def test_instantiations_cover_every_supported_dtype_and_head_dim():
    names = _instantiations()
    assert len(names["forward.cu"]) == 2 * 2 * 2  # dtypes x head dims x causal
    assert any("__nv_bfloat16, 128" in n for n in names["decode.cu"])
    assert cuda.SUPPORT.dtypes == (torch.float16, torch.bfloat16)


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CI"):
        pytest.fail("nvcc is not on PATH: CI must compile the CUDA sources")
    if found is None:
        pytest.skip("nvcc is not installed")
    return found


def test_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = _nvcc()
    jobs = []
    for source, names in _instantiations().items():
        # Taking each instantiation's address makes nvcc compile it, as NVRTC's name expressions do.
        unit = tmp_path / f"instantiate_{source}"
        unit.write_text(f'#include "{source}"\n' + "void* const instantiations[] = {\n"
                        + "".join(f"    (void*)&{name},\n" for name in names) + "};\n")
        for arch in ARCHS:
            jobs.append((source, arch, [nvcc, "-std=c++17", f"-arch={arch}", "-cubin", f"-I{cuda.KERNELS}",
                                        "-o", str(tmp_path / f"{source}.{arch}.cubin"), str(unit)]))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: subprocess.run(job[2], capture_output=True, text=True), jobs))
    failed = [f"{source} for {arch}:\n{r.stderr[-3000:]}" for (source, arch, _), r in zip(jobs, results)
              if r.returncode != 0]
    assert not failed, "\n".join(failed)
    for source, arch, _ in jobs:
        assert (tmp_path / f"{source}.{arch}.cubin").stat().st_size > 0
