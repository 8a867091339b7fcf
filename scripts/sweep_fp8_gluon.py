"""The Gluon FP8 forward on pre-arranged e4m3 inputs (H100/H200):
TFLOP/s of `fp8_hopper.hopper.forward` at each combination of --stages, --fma-shares, --persistent,
--step-keys, --kv-block-descales, --exp-turns and --lane-sums (the kernel's settings; a setting the kernel
cannot launch, too much shared memory, says so), beside the portable Triton kernel
through attention() on the same inputs and cuDNN's bf16. Run from the repository root with
PYTHONPATH=src:scripts; one line per case starting with `sweep:`."""

from __future__ import annotations

import argparse
import itertools
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from flashdispatch import attention
from flashdispatch.backends.fp8_hopper import hopper, to_kernel_layout
from flashdispatch.dispatcher.problem import build_problem
from flashdispatch.timing import median_times
from gpu_grid import prefill_cases

FP8 = torch.float8_e4m3fn
WARM_SECONDS = 0.2  # `median_times`: each case's runs start at a settled clock
REPEATS = 20


def _difference(result, baseline) -> str:
    """How far (out, lse) is from the first setting's: the outputs' relative difference, the LSEs'
    largest."""
    (out, lse), (out0, lse0) = result, baseline
    relative = ((out.float() - out0.float()).norm() / out0.float().norm()).item()
    return f"out differs by {relative:.1e}, lse by {(lse - lse0).abs().max().item():.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", default=str(hopper.STAGES), help="comma-separated hopper.STAGES values")
    parser.add_argument("--persistent", default="1",
                        help="comma-separated 0 (one program per tile), 1 (one per SM at hopper.PERSISTENT's head dims, "
                        "causal where hopper.CAUSAL_PERSISTENT says) or 2 (causal too, at every length, in row block pairs)")
    parser.add_argument("--step-keys", default="",
                        help="comma-separated keys a step, causal or not, descales per head or per step (hopper.STEP_KEYS, "
                        "CAUSAL_STEP_KEYS, QUANTIZED_STEP_KEYS; 192: "
                        "two score tiles); default the kernel's")
    parser.add_argument("--kv-block-descales", default="0",
                        help="comma-separated 0 (one K and V descale per head, as pre-quantized inputs have) or 1 (one "
                        "per key step, as quantized ones have: the kernel's general path), all ones either way")
    for flag, values in (("--fma-shares", "hopper.FMA_SHARE values"),
                         ("--exp-turns", "0 (consumers free-running) or 1 (taking turns at the exponentials)"),
                         ("--lane-sums", "0 or 1 (hopper.LANE_SUMS: row sums per lane)")):
        parser.add_argument(flag, default="", help=f"comma-separated {values}; default the kernel's at each head dim")
    parser.add_argument("--causal-head-groups", default="",
                        help="comma-separated hopper.CAUSAL_HEAD_GROUP values (causal tiles in groups of that many "
                        "heads); default the kernel's")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--lengths", default="4096,16384", help="comma-separated sequence lengths (16k tokens a case)")
    args = parser.parse_args()
    # -1: the kernel's own setting at the head dim
    settings = list(itertools.product(*([int(x) for x in arg.split(",")] for arg in (
        args.stages, args.fma_shares or "-1", args.persistent, args.step_keys or "0", args.kv_block_descales,
        args.exp_turns or "-1", args.lane_sums or "-1", args.causal_head_groups or str(hopper.CAUSAL_HEAD_GROUP)))))
    head_dims = tuple(int(x) for x in args.head_dims.split(","))
    for d, n, causal, q, k, v, flops in prefill_cases(head_dims=head_dims, lengths=tuple(int(x) for x in args.lengths.split(","))):
        q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
        ones = torch.ones(q.shape[0], q.shape[1], device="cuda")
        problem = build_problem(q8, k8, v8, causal=causal, descales=(ones, ones, ones))
        vt = to_kernel_layout(v8).transpose(2, 3)
        vt = vt.as_strided((*vt.shape[:3], -(-n // 16) * 16), vt.stride())
        baseline = None  # the first setting's (out, lse): a sanity check of the others
        defaults = (hopper.STAGES, dict(hopper.FMA_SHARE), hopper.PERSISTENT, dict(hopper.STEP_KEYS),
                    dict(hopper.CAUSAL_STEP_KEYS), dict(hopper.EXP_TURNS), dict(hopper.LANE_SUMS),
                    dict(hopper.QUANTIZED_STEP_KEYS))
        failures, checks, timed = [], {}, {}  # timed: name -> a call that sets its setting, then runs
        head_group = hopper.CAUSAL_HEAD_GROUP
        causal_persistent = hopper.CAUSAL_PERSISTENT
        for stages, fma_share, persistent, keys, kv_blocks, turns, lanes, group in settings:
            if group != settings[0][7] and not causal:
                continue  # the head groups order causal tiles only
            if persistent == 2 and not causal and any(setting[2] == 1 for setting in settings):
                continue  # 2 differs from 1 for causal tiles only
            def gluon(stages=stages, fma_share=fma_share, persistent=persistent, keys=keys, kv_blocks=kv_blocks,
                      turns=turns, lanes=lanes, group=group):
                hopper.STAGES = stages
                hopper.FMA_SHARE = {**defaults[1], d: defaults[1][d] if fma_share < 0 else fma_share}
                hopper.EXP_TURNS = {**defaults[5], d: defaults[5][d] if turns < 0 else bool(turns)}
                hopper.LANE_SUMS = {**defaults[6], d: defaults[6][d] if lanes < 0 else bool(lanes)}
                hopper.PERSISTENT = defaults[2] if persistent else ()
                hopper.CAUSAL_PERSISTENT = ({d: math.inf} if persistent == 2 else causal_persistent if persistent
                                            else {})
                hopper.CAUSAL_HEAD_GROUP = group
                hopper.STEP_KEYS = {**defaults[3], d: keys or defaults[3][d]}
                hopper.CAUSAL_STEP_KEYS = {**defaults[4], d: keys or defaults[4][d]}
                hopper.QUANTIZED_STEP_KEYS = {**defaults[7], d: keys or defaults[7][d]}
                steps = -(-n // hopper.step_keys(d, causal, bool(kv_blocks), n))
                descales = (ones, *(ones[:, :, None].expand(*ones.shape, steps) if kv_blocks else ones
                                    for _ in range(2)))
                return hopper.forward(q8, k8, vt, descales, 1, torch.bfloat16, problem)
            result = gluon()
            keys_now = hopper.step_keys(d, causal, bool(kv_blocks), n)
            pairs = causal and n < hopper.CAUSAL_PERSISTENT.get(d, 0)  # `hopper.forward`'s rule
            name = (f"gluon[{keys_now} keys, {hopper.STAGES} stages, fma 1/{hopper.FMA_SHARE[d]}"
                    f"{', persistent' if d in hopper.PERSISTENT and not causal else ''}"
                    f"{', persistent in row block pairs' if pairs else ''}"
                    f"{', K/V descales per step' if kv_blocks else ''}{', exp turns' if hopper.EXP_TURNS[d] else ''}"
                    f"{', sums per lane' if hopper.LANE_SUMS[d] else ''}"
                    f"{f', heads in groups of {group}' if causal and group > 1 and not pairs else ''}]")
            if result is None:
                why = hopper._failure or "TMA cannot address the tensors"
                failures.append(f"{name} fails ({why.splitlines()[0]})")
                hopper._failure = None
                continue
            baseline = baseline or result
            checks[name] = _difference(result, baseline)
            timed[name] = gluon

        def portable():
            hopper._failure = "sweep: the portable kernel"
            try:
                return attention(q8, k8, v8_bshd, causal=causal, q_descale=ones, k_descale=ones, v_descale=ones)
            finally:
                hopper._failure = None

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return scaled_dot_product_attention(q, k, v, is_causal=causal)

        v8_bshd = v8.transpose(2, 3).contiguous().transpose(2, 3)
        timed["portable"] = portable
        try:
            cudnn()
            timed["cudnn bf16"] = cudnn
        except RuntimeError:  # cuDNN may refuse a case
            failures.append("cudnn bf16 refuses this case")
        # In turns (`median_times`): the H100's clock drifts under this load, and all settings see it alike.
        seconds = median_times(list(timed.values()), "cuda", repeats=REPEATS, warm_seconds=WARM_SECONDS)
        (hopper.STAGES, hopper.FMA_SHARE, hopper.PERSISTENT, hopper.STEP_KEYS, hopper.CAUSAL_STEP_KEYS,
         hopper.EXP_TURNS, hopper.LANE_SUMS, hopper.QUANTIZED_STEP_KEYS) = defaults
        hopper.CAUSAL_HEAD_GROUP = head_group
        hopper.CAUSAL_PERSISTENT = causal_persistent
        rates = [f"{name} {flops / t / 1e12:.0f}" + (f" ({checks[name]})" if name in checks else "")
                 for name, t in zip(timed, seconds)] + failures
        print(f"sweep: D={d} N={n} causal={causal}: " + ", ".join(rates) + " TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
