"""GPU checks of the `fp8-hopper` backend (H100), one part per call:

    --part exact     the FP8 rule against float64 on pre-quantized and on quantized bf16 inputs
    --part accuracy  RMSE against float64 on FlashAttention-3's outlier inputs: block scales with
                     the Hadamard rotation, without it, and plain per-tensor FP8
    --part sass      the attention kernel's SASS: its QGMMA (FP8 wgmma) instructions
    --part speed     TFLOP/s side by side with sdpa-cudnn and sdpa-flash in bf16
    --part plot      a figure of a speed log (--log, --out; no GPU)

The FP8 rule: the inputs are rounded through FP8 first (the references see exactly what the kernel
sees), and the kernel's max error against float64 must be at most 2x that of plain math in the
same precision (scores in float32 from the FP8 inputs, P rounded to e4m3 before P V, as the kernel
does) plus 1e-3 x the output's scale; the LSE within LSE_TOLERANCE x the largest |score|. Run from the repository root with PYTHONPATH=src:scripts.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

FP8 = torch.float8_e4m3fn
# The LSE's tolerance, relative to the largest |scaled score| (at least 1): Hopper's FP8 wgmma
# keeps about 14 mantissa bits while it accumulates (DeepSeek-V3's measurement), so the scores,
# and the LSE built on them, carry errors in proportion to their size, not float32's.
LSE_TOLERANCE = 2e-3


def reference(q, k, v, causal, scale):
    """float64 attention, bottom-right causal, GQA by repetition, (B, H, N, D) float64 inputs."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]).nan_to_num(0.0) @ v, lse, s.masked_fill(s.isinf(), 0).abs().max().item()


def plain_fp8_math(q, k, v, causal, scale):
    """Plain math in the kernel's precision: float32 scores of the (dequantized) FP8 inputs, P
    rounded to e4m3 before its product with V, normalised by the float32 sum."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.float() @ k.transpose(-1, -2) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq
        s = s.masked_fill(~visible, float("-inf"))
    top = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    p = torch.exp(s - top)
    return ((p * 256).to(FP8).float() / 256 @ v) / p.sum(-1, keepdim=True).clamp_min(1e-30)


def exact() -> int:
    from flashdispatch import attention
    from flashdispatch.conformance import poisoned
    from flashdispatch.backends.fp8_hopper import quantization_blocks, to_kernel_layout
    from flashdispatch.backends.fp8_hopper.quantize import quantize, random_signs
    from flashdispatch.dispatcher.problem import build_problem

    failures = checks = 0
    cases = [(2, 8, 2, 300, 300, 128, True), (2, 8, 8, 257, 513, 128, False), (1, 4, 1, 700, 200, 64, True),
             (3, 4, 4, 130, 1030, 64, False), (1, 4, 2, 1000, 1000, 256, True), (2, 4, 4, 129, 700, 256, False),
             (1, 16, 2, 4096, 4096, 128, True), (2, 8, 8, 5, 3000, 128, True),
             # causal tiles go 4 heads at a time (hopper.CAUSAL_HEAD_GROUP): 6 heads leave a group of 2
             (3, 2, 1, 600, 600, 128, True),
             # causal with 8k keys and more: 192-key steps (hopper.CAUSAL_LONG_KEYS), a ragged last one
             (1, 2, 2, 300, 8200, 128, True),
             # D = 128 non-causal: a last step whose second tile (192-key steps) lies past the keys;
             # more tiles than SMs (the persistent kernel takes several); 16k keys a row (sums that
             # would drift in an FP8 accumulator)
             (2, 8, 2, 300, 300, 128, False), (2, 16, 4, 1100, 1000, 128, False), (1, 4, 4, 256, 16384, 128, False)]
    for b, hq, hkv, nq, nk, d, causal in cases:
        for way in ("pre-quantized", "bf16 in", "bshd", "kernel layout"):
            gen = torch.Generator(device="cuda").manual_seed(checks)
            q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen) * 2 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
            scale = 1 / math.sqrt(d)
            if way == "bf16 in":
                q, k, v = (t.bfloat16() for t in (q, k, v))
                # What the kernel sees, dequantized: the rotated, block-quantized Q and K, and V.
                signs = random_signs(d, 0, "cuda")
                seen = []
                block_m, block_n = quantization_blocks(build_problem(q, k, v, causal=causal, precision="fp8"))
                for t, rows, rotate, transpose in ((q, block_m, True, False), (k, block_n, True, False),
                                                   (v, block_n, False, True)):
                    x8, descale = quantize(t, rows, signs if rotate else None, transpose=transpose)
                    x = x8.double()
                    if transpose:
                        x = x[..., :t.shape[2]].transpose(2, 3)
                    seen.append(x * descale.double().repeat_interleave(rows, dim=2)[:, :, :t.shape[2], None])

                def run():
                    return attention(q, k, v, causal=causal, precision="fp8", return_lse=True)
            else:
                descales = [torch.rand(b, hkv, device="cuda", generator=gen) + 0.5 for _ in range(3)]
                q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
                group = hq // hkv
                seen = [q8.double() * descales[0].double().repeat_interleave(group, 1)[:, :, None, None],
                        k8.double() * descales[1].double()[:, :, None, None],
                        v8.double() * descales[2].double()[:, :, None, None]]
                args = {"pre-quantized": (q8, k8, v8), "kernel layout": (q8, k8, to_kernel_layout(v8)),
                        "bshd": tuple(t.transpose(1, 2) for t in (q8, k8, v8))}[way]
                layout = "bshd" if way == "bshd" else "bhsd"

                def run():
                    out, lse = attention(*args, causal=causal, q_descale=descales[0], k_descale=descales[1],
                                         v_descale=descales[2], return_lse=True, layout=layout)
                    return (out.transpose(1, 2) if layout == "bshd" else out), lse
            ref, ref_lse, top = reference(*seen, causal, scale)
            with poisoned("cuda"):  # every allocation starts NaN: an element the kernel misses shows
                out, lse = run()
            base = (plain_fp8_math(*seen, causal, scale).double() - ref).abs().max().item()
            err = (out.double() - ref).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().nan_to_num(0.0).max().item()
            floor = 1e-3 * ref.abs().max().item()
            ok = bool(torch.isfinite(out).all()) and not lse.isnan().any() and err <= 2 * base + floor and lse_err <= LSE_TOLERANCE * max(1.0, top)
            checks += 1
            failures += not ok
            print(f"exact: {'ok  ' if ok else 'FAIL'} {way:13s} B={b} H={hq}/{hkv} N={nq}/{nk} D={d} causal={causal}: "
                  f"err {err:.2e} (plain FP8 math {base:.2e}), lse err {lse_err:.1e} (max |score| {top:.1f})", flush=True)
    print(f"exact: {checks} checks, {failures} failed", flush=True)
    return 1 if failures else 0


def outliers(shape, gen):
    """FlashAttention-3's inputs with outliers: N(0, 1) + N(0, 100) x Bernoulli(0.001)."""
    normal = torch.randn(shape, device="cuda", generator=gen)
    spikes = torch.randn(shape, device="cuda", generator=gen) * 10
    keep = torch.rand(shape, device="cuda", generator=gen) < 0.001
    return normal + spikes * keep


def accuracy() -> int:
    from flashdispatch import attention, configure
    from flashdispatch.dispatcher.policy import active_policy

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, d = 4, 16, 4096, 128
    q, k, v = (outliers((b, h, n, d), gen).bfloat16() for _ in range(3))
    ref, _, _ = reference(*(t.double() for t in (q, k, v)), False, 1 / math.sqrt(d))

    def rmse(out):
        return (out.double() - ref).pow(2).mean().sqrt().item()

    results = {"bf16 (sdpa-cudnn)": rmse(attention(q, k, v, backend="sdpa-cudnn"))}
    results["fp8 block scales + rotation"] = rmse(attention(q, k, v, precision="fp8"))
    configure({"fp8": {"rotation": False}})
    try:
        results["fp8 block scales, no rotation"] = rmse(attention(q, k, v, precision="fp8"))
    finally:
        configure(None)
    assert active_policy().fp8_rotation
    # Plain per-tensor FP8: one scale per tensor, no rotation, through the pre-quantized path.
    scaled = [(t, t.float().abs().amax().item() / 448.0) for t in (q, k, v)]
    q8, k8, v8 = ((t.float() / s).to(FP8) for t, s in scaled)
    descales = [torch.full((b, h), s, device="cuda") for _, s in scaled]
    results["fp8 per-tensor, no rotation"] = rmse(attention(q8, k8, v8, q_descale=descales[0], k_descale=descales[1],
                                                            v_descale=descales[2]))
    for name, value in results.items():
        print(f"accuracy: RMSE {name}: {value:.3e}", flush=True)
    best, plain = results["fp8 block scales + rotation"], results["fp8 per-tensor, no rotation"]
    ok = best <= 9.1e-3 and best <= plain / 2
    print(f"accuracy: {'ok' if ok else 'FAIL'}: {best:.2e} <= 9.1e-3 and <= half of per-tensor {plain:.2e} "
          f"({plain / best:.2f}x lower)", flush=True)
    return 0 if ok else 1


def _disassemble(cubin: bytes) -> str:
    """cuobjdump -sass of a CUBIN (Triton 3.6 keeps no SASS of its own)."""
    import glob
    import shutil
    import subprocess
    import tempfile

    tool = shutil.which("cuobjdump") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))), None)
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def sass() -> int:
    """The SASS of the kernels that run pre-quantized D = 128 calls: the Gluon one (`hopper.py`)
    and the portable one (`kernel.py`, the fallback)."""
    import re

    from flashdispatch.backends import fp8_hopper
    from flashdispatch.backends.fp8_hopper import hopper
    from flashdispatch.dispatcher.problem import build_problem

    q, k, v = (torch.randn(1, 2, 256, 128, device="cuda").to(FP8) for _ in range(3))
    ones = torch.ones(1, 2, device="cuda")
    problem = build_problem(q, k, v, descales=(ones, ones, ones))
    failures = 0
    for name, compiled in (
            ("gluon", hopper.forward(q, k, v.transpose(2, 3).contiguous(), (ones,) * 3, 1, torch.bfloat16, problem,
                                     compile_only=True)),
            ("portable", _compile_portable(fp8_hopper, q, k, v))):
        text = compiled.asm.get("sass") or _disassemble(compiled.asm["cubin"])
        ops = re.findall(r"\b(QGMMA|HGMMA|HMMA|QMMA|IMMA)\.[\w.]+", text)
        kinds = sorted(set(ops))
        print(f"sass: {name}: {len(text.splitlines())} lines; matmul instructions: "
              + ", ".join(f"{kind} x{ops.count(kind)}" for kind in kinds), flush=True)
        for line in sorted({ln.strip()[:140] for ln in text.splitlines() if "QGMMA" in ln})[:4]:
            print("sass:   " + line, flush=True)
        failures += "QGMMA" not in kinds
    return 1 if failures else 0


def _compile_portable(fp8_hopper, q, k, v):
    import triton

    from flashdispatch.backends.fp8_hopper.kernel import fp8_attention_forward

    vt = v.transpose(2, 3).contiguous()
    out = torch.empty(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 256, device="cuda")
    scales = torch.ones(1, 2, 2, device="cuda")
    rows, keys, warps, stages = fp8_hopper.tiles(128, False)
    return fp8_attention_forward[(triton.cdiv(256, rows), 2)](
        q, k, vt, out, lse, scales, scales, scales, *q.stride(), *k.stride(), *vt.stride(), *out.stride(),
        *scales.stride(), *scales.stride()[:2], *scales.stride()[:2], 2, 1, 256, 256, 0.1,
        HEAD_DIM=128, BLOCK_M=rows, BLOCK_N=keys, CAUSAL=False, WIDE=False, num_warps=warps, num_stages=stages)


WARM_SECONDS = 0.2  # `median_times`: each case's runs start at a settled clock
REPEATS = 30


def speed(head_dims, lengths) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashdispatch import attention
    from flashdispatch.backends.fp8_hopper import to_kernel_layout
    from flashdispatch.timing import median_times
    from gpu_grid import prefill_cases

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def with_sdpa(kind, q, k, v, causal):
        def run():
            with sdpa_kernel(kind):
                return sdpa(q, k, v, is_causal=causal)
        try:
            run()
        except RuntimeError:
            return None  # this SDPA kernel refuses the case
        return run

    for d, n, causal, q, k, v, flops in prefill_cases(head_dims=head_dims, lengths=lengths):
        q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
        v8_kmajor = to_kernel_layout(v8)  # rearranged once, as a V that stays fixed over calls can be
        ones = torch.ones(q.shape[0], q.shape[1], device="cuda")
        candidates = {
            "fp8 pre-quantized": lambda: attention(q8, k8, v8_kmajor, causal=causal, q_descale=ones, k_descale=ones,
                                                   v_descale=ones),
            "fp8 pre-quantized, V rearranged in the call": lambda: attention(q8, k8, v8, causal=causal, q_descale=ones,
                                                                             k_descale=ones, v_descale=ones),
            "fp8 from bf16 (quantize + rotate)": lambda: attention(q, k, v, causal=causal, precision="fp8"),
            "cudnn bf16": with_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
            "flash bf16": with_sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal),
        }
        timed = {name: fn for name, fn in candidates.items() if fn is not None}
        # In turns (`median_times`): the H100's clock drifts under this load, and all of them see it alike.
        seconds = dict(zip(timed, median_times(list(timed.values()), "cuda", repeats=REPEATS,
                                               warm_seconds=WARM_SECONDS)))
        rates = {name: flops / seconds[name] / 1e12 if name in seconds else float("nan") for name in candidates}
        cudnn = rates["cudnn bf16"]
        print(f"speed: D={d} N={n} causal={causal}: " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items())
              + f" TFLOP/s; pre-quantized {rates['fp8 pre-quantized'] / cudnn:.2f}x cudnn, "
              f"with quantization {rates['fp8 from bf16 (quantize + rotate)'] / cudnn:.2f}x", flush=True)
    return 0


def plot(log: str, path: str, card: str) -> int:
    """A bar chart of a --part speed log: FP8 (pre-quantized, and from bf16) against cuDNN's bf16."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = re.findall(r"D=(\d+) N=(\d+) causal=(\w+): fp8 pre-quantized (\d+), .*?quantize \+ rotate\) (\d+), "
                      r"cudnn bf16 (\d+)", open(log).read())
    labels = [f"D={d}\nN={int(n) // 1024}k{' c' if c == 'True' else ''}" for d, n, c, *_ in rows]
    fig, axis = plt.subplots(figsize=(14, 4.5))
    for i, name in enumerate(("fp8 pre-quantized", "fp8 from bf16", "sdpa-cudnn bf16")):
        axis.bar([j + (i - 1) * 0.27 for j in range(len(rows))], [float(r[3 + i]) for r in rows], 0.27, label=name)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set_ylabel("forward TFLOP/s")
    axis.set_title(f"fp8-hopper on an {card} (16k tokens, 2048 / D heads)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", required=True, choices=("exact", "accuracy", "sass", "speed", "plot"))
    parser.add_argument("--log", help="--part plot: the speed log")
    parser.add_argument("--out", help="--part plot: the figure's path")
    parser.add_argument("--card", default="H100", help="--part plot: the GPU the log was measured on, for the title")
    parser.add_argument("--head-dims", default="64,128,256", help="--part speed: head dims, comma-separated")
    parser.add_argument("--lengths", default="1024,4096,16384", help="--part speed: sequence lengths")
    parser.add_argument("--step-keys", type=int, help="the Gluon kernel's keys a step at D = 128, causal or not, "
                        "pre-quantized or not (hopper.STEP_KEYS, CAUSAL_STEP_KEYS, QUANTIZED_STEP_KEYS), for every "
                        "part: 192 for steps of two score tiles")
    args = parser.parse_args()
    from flashdispatch.backends.fp8_hopper import hopper

    if args.step_keys:
        hopper.STEP_KEYS = {**hopper.STEP_KEYS, 128: args.step_keys}
        hopper.CAUSAL_STEP_KEYS = {**hopper.CAUSAL_STEP_KEYS, 128: args.step_keys}
        hopper.QUANTIZED_STEP_KEYS = {**hopper.QUANTIZED_STEP_KEYS, 128: args.step_keys}
    if args.part == "plot":
        return plot(args.log, args.out, args.card)
    if args.part == "speed":
        return speed(*(tuple(int(x) for x in arg.split(",")) for arg in (args.head_dims, args.lengths)))
    return {"exact": exact, "accuracy": accuracy, "sass": sass}[args.part]()


if __name__ == "__main__":
    sys.exit(main())
