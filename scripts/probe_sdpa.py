"""Probe what PyTorch's SDPA kernels accept on this GPU and PyTorch version.

The sdpa-* backends declare their support from what this script observed; rerun it on a new
PyTorch release or GPU and compare. Prints one line per (kernel, case): ok with the max error
against float64, or the exception PyTorch raised.
"""
import math
import sys

import torch

aten = torch.ops.aten


def reference(q, k, v, causal, scale):
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        nq, nk = s.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril(nk - nq)
        s = s.masked_fill(~keep, -math.inf)
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


def run(kernel, q, k, v, causal, scale):
    if kernel == "flash":
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        dout = torch.randn_like(out)
        g = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, res[2], res[3], res[4], res[5], 0.0, causal, res[6], res[7], scale=scale)
    elif kernel == "efficient":
        res = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1]
        dout = torch.randn_like(out)
        g = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, res[2], res[3], 0.0,
            [True, True, True, False], causal, scale=scale)
    else:
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        dout = torch.randn_like(out)
        g = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, res[6], res[7], None, res[2], res[3],
            res[4], res[5], 0.0, causal, scale=scale)
    return out, lse, g


def main():
    dev = "cuda"
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, p.major, p.minor, "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
    print("props", [a for a in dir(p) if not a.startswith("_")])
    cases = []
    for d in (32, 40, 64, 72, 96, 128, 160, 192, 256, 512):
        cases.append(dict(d=d, hq=4, hkv=4, nq=129, nk=129, causal=False, dtype=torch.bfloat16))
    for dtype in (torch.float16, torch.float32):
        cases.append(dict(d=64, hq=4, hkv=4, nq=129, nk=129, causal=False, dtype=dtype))
    cases += [
        dict(d=64, hq=8, hkv=2, nq=129, nk=129, causal=False, dtype=torch.bfloat16, tag="gqa"),
        dict(d=64, hq=8, hkv=2, nq=129, nk=129, causal=True, dtype=torch.bfloat16, tag="gqa"),
        dict(d=64, hq=4, hkv=4, nq=129, nk=129, causal=True, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=17, nk=300, causal=False, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=300, nk=17, causal=False, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=17, nk=300, causal=True, dtype=torch.bfloat16, tag="topleft?"),
        dict(d=64, hq=4, hkv=4, nq=300, nk=17, causal=True, dtype=torch.bfloat16, tag="topleft?"),
        dict(d=64, hq=4, hkv=4, nq=1, nk=4096, causal=False, dtype=torch.bfloat16),
        dict(d=128, hq=32, hkv=8, nq=1, nk=4096, causal=True, dtype=torch.bfloat16, tag="gqa"),
        dict(d=256, hq=4, hkv=4, nq=1000, nk=1000, causal=True, dtype=torch.float16),
        dict(d=40, hq=4, hkv=4, nq=1000, nk=1000, causal=True, dtype=torch.float32),
        dict(d=128, hq=32, hkv=8, nq=1, nk=4096, causal=False, dtype=torch.bfloat16, tag="gqa"),
        dict(d=64, hq=4, hkv=4, nq=1, nk=1, causal=False, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=0, nk=16, causal=False, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=16, nk=0, causal=False, dtype=torch.bfloat16),
        dict(d=64, hq=4, hkv=4, nq=129, nk=129, causal=False, dtype=torch.bfloat16, tag="bshd"),
        dict(d=64, hq=4, hkv=4, nq=129, nk=129, causal=False, dtype=torch.bfloat16, tag="dv32"),
    ]
    for kernel in ("flash", "efficient", "cudnn"):
        for c in cases:
            torch.manual_seed(0)
            shape_q = (2, c["hq"], c["nq"], c["d"])
            shape_k = (2, c["hkv"], c["nk"], c["d"])
            dv = 32 if c.get("tag") == "dv32" else c["d"]
            shape_v = (2, c["hkv"], c["nk"], dv)
            if c.get("tag") == "bshd":
                q = torch.randn(2, c["nq"], c["hq"], c["d"], device=dev, dtype=c["dtype"]).transpose(1, 2)
                k = torch.randn(2, c["nk"], c["hkv"], c["d"], device=dev, dtype=c["dtype"]).transpose(1, 2)
                v = torch.randn(2, c["nk"], c["hkv"], dv, device=dev, dtype=c["dtype"]).transpose(1, 2)
            else:
                q = torch.randn(shape_q, device=dev, dtype=c["dtype"])
                k = torch.randn(shape_k, device=dev, dtype=c["dtype"])
                v = torch.randn(shape_v, device=dev, dtype=c["dtype"])
            scale = 1 / math.sqrt(c["d"])
            label = f"{kernel:9s} d={c['d']:3d} {str(c['dtype'])[6:]:8s} h={c['hq']}/{c['hkv']} n={c['nq']}/{c['nk']} causal={c['causal']:d} {c.get('tag', '')}"
            try:
                out, lse, g = run(kernel, q, k, v, c["causal"], scale)
                torch.cuda.synchronize()
                ref, ref_lse = reference(q, k, v, c["causal"], scale)
                err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
                lse_v = lse[..., : c["nq"]] if lse.dim() == 3 else lse
                lse_err = (lse_v.double().reshape(ref_lse.shape) - ref_lse).abs().nan_to_num(0).max().item() if ref_lse.numel() else 0.0
                print(f"OK   {label} err={err:.2e} lse{tuple(lse.shape)} {lse.dtype} lse_err={lse_err:.2e} dq{tuple(g[0].shape)} dk{tuple(g[1].shape)} nan={bool(out.isnan().any())}")
            except Exception as e:  # noqa: BLE001 - this script reports every failure
                msg = str(e).strip().splitlines()
                print(f"FAIL {label} {type(e).__name__}: {msg[0][:160] if msg else ''}")
            sys.stdout.flush()
    # Determinism of each backward.
    import time
    q = torch.randn(2, 8, 1024, 64, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    for kernel in ("flash", "efficient", "cudnn"):
        torch.manual_seed(1)
        a = run(kernel, q, k, v, False, 0.125)[2]
        torch.manual_seed(1)
        b = run(kernel, q, k, v, False, 0.125)[2]
        print("deterministic", kernel, all(torch.equal(x, y) for x, y in zip(a, b)))
    # Host time of a tiny call through the public API.
    q = torch.randn(1, 1, 16, 64, device=dev, dtype=torch.bfloat16)
    for _ in range(100):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(1000):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    print("public sdpa tiny call us", (time.perf_counter() - t) * 1e3)


if __name__ == "__main__":
    main()
