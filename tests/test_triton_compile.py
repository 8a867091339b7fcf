"""The Triton kernels compile for Ampere (sm80) and Hopper (sm90), without a GPU.

The CPU interpreter runs the kernels' logic but not the compiler's checks (a shape that changes
between the branches of an if, say, passes the interpreter and fails on the GPU). Here each kernel
is compiled through Triton's full pipeline, PTX and cubin included, for both targets, over the
constexpr combinations the backend launches. Runs in a subprocess: the test session sets
TRITON_INTERPRET=1, under which kernels are not compiled. TRITON_CACHE_DIR points at a fresh folder, so nothing is
taken from an earlier compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashdispatch.backends.triton import kernels

POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
FLOAT32_POINTERS = {"Lse", "Delta", "Partial", "PartialLse"}

def signature(fn, constexprs, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + dtype
        elif name in FLOAT32_POINTERS:
            sig[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            sig[name] = "*i32"
        elif name in ("scale", "softcap"):
            sig[name] = "fp32"
        elif name.startswith("desc_"):
            block = constexprs["BLOCK_N"], constexprs["BLOCK_D"]
            sig[name] = f"tensordesc<{dtype}[1,1,{block[0]},{block[1]}]>"
        else:
            sig[name] = "i32"
    return sig

# Cold compiles take seconds each, so a few variants that between them reach every branch of the
# kernels: varlen + softcap with a padded head dim (40 in a 64 tile), the packed-GQA decoding
# forward, the float32 (3xTF32 dot) variant with an unpadded head dim, the split merge and delta
# kernels, and (sm90 only: tensor descriptors need Hopper) the forward loading K and V through TMA.
def variants(arch):
    for varlen, softcap, dtype, float32, (head_dim, block_d) in (
            (True, True, "bf16", False, (40, 64)), (False, False, "fp32", True, (128, 128))):
        common = dict(VARLEN=varlen, SOFTCAP=softcap, FLOAT32=float32, BLOCK_M=64, BLOCK_N=64, HEAD_DIM=head_dim,
                      HEAD_DIM_V=head_dim, BLOCK_D=block_d, BLOCK_DV=block_d)
        yield dtype, kernels.attention_forward, dict(common, PACK_GQA=not varlen, SCALE_FIRST=float32, TMA=False,
                                                     desc_k=None, desc_v=None)
        yield dtype, kernels.attention_backward_dkdv, common
        yield dtype, kernels.attention_backward_dq, common
        yield dtype, kernels.attention_backward_delta, dict(VARLEN=varlen, BLOCK_M=64, HEAD_DIM_V=head_dim,
                                                            BLOCK_DV=block_d)
        yield dtype, kernels.merge_splits, dict(HEAD_DIM_V=head_dim, BLOCK_S=16, BLOCK_DV=block_d)
    if arch >= 90:
        yield "bf16", kernels.attention_forward, dict(
            VARLEN=False, SOFTCAP=False, SCALE_FIRST=False, FLOAT32=False, PACK_GQA=False, TMA=True, BLOCK_M=128,
            BLOCK_N=128,
            HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_D=128, BLOCK_DV=128)

failures = 0
for arch in (80, 90):
    for dtype, fn, constexprs in variants(arch):
        src = ASTSource(fn=fn, signature=signature(fn, constexprs, dtype),
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", arch, 32))
        except Exception as exc:
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failures += 1
            print(f"sm{arch} {fn.__name__} {dtype} {constexprs}: {type(cause).__name__}: {cause}", file=sys.stderr)
print("failures", failures)
sys.exit(1 if failures else 0)
"""


def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]


GLUON_SCRIPT = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from flashdispatch.backends.triton import hopper

fn = hopper.hopper_attention_forward
failures = 0
for head_dim, causal, dtype in ((128, False, torch.bfloat16), (128, True, torch.float16), (64, True, torch.bfloat16)):
    t = torch.empty(2, 4, 256, head_dim, dtype=dtype)
    descriptor = mangle_type(hopper._descriptor(t, t.stride(), 2, 4, 256, head_dim, hopper.BLOCK_M))
    constexprs = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=hopper.BLOCK_M, BLOCK_N=hopper.BLOCK_N,
                      STAGES=hopper.STAGES)
    pointer = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    types = {"Out": pointer, "Lse": "*fp32", "qk_scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else descriptor if name.endswith("_desc")
                 else types.get(name, "i32") for name in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=signature,
                         constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=hopper.NUM_WARPS, maxnreg=hopper.MAX_REGISTERS))
        assert "wgmma.wait_group.sync.aligned 1" in compiled.asm["ptx"], "no wgmma left in flight under the softmax"
    except Exception as exc:
        failures += 1
        print(f"D={head_dim} causal={causal} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
sys.exit(1 if failures else 0)
"""


def test_the_gluon_hopper_forward_compiles_for_sm90(tmp_path):
    pytest.importorskip("flashdispatch.backends.triton.hopper")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", GLUON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
