"""The conformance suite's FP8 rule (backends that declare the "fp8" precision), on the CPU.

1. Case generation: an FP8-capable backend gets "fp8-..." cases (pre-quantized float8_e4m3fn
   inputs, forward only) covering what it declares; a native backend gets none, and a backend
   that only runs FP8 gets no native-dtype cases.
2. The FP8 reference, baseline and rule: the inputs are really rounded through FP8 with random
   descales; the baseline is what the rule says it is; a fake backend returning the exact float64
   result of the dequantized inputs passes, and fakes with FP8 bugs (an error 10x the baseline's,
   a forgotten descale, the wrong KV head's descale, a read past the end of v, uninitialised
   output rows, a float16 output, a modified descale) fail.
3. On a CPU device, the real fp8-hopper backend's FP8 cases are skipped with the reason (Triton's
   CPU interpreter converts to FP8 wrongly), never failed or silently dropped.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flashdispatch import conformance
from flashdispatch.backends.base import Backend, Support, from_bhsd, to_bhsd
from flashdispatch.backends.reference import ReferenceBackend
from flashdispatch.conformance import FP8_CPU_REASON, cases, check_case
from flashdispatch.conformance.checks import fill_inputs, make_inputs
from flashdispatch.conformance.oracle import fp8_baseline, fp8_reference
from flashdispatch.dispatcher.problem import build_problem
from flashdispatch.dispatcher.registry import REGISTRY

FP8 = torch.float8_e4m3fn

# What the real fp8-hopper declares, for fakes that run on the CPU without Triton.
FP8_SUPPORT = Support(
    dtypes=(torch.float16, torch.bfloat16, FP8),
    devices=("cuda", "cpu"),
    min_head_dim=64,
    max_head_dim=256,
    head_dim_multiple=64,
    head_dim_v_must_equal=True,
    causal=True,
    gqa=True,
    layouts=("bhsd", "bshd"),
    precisions=("fp8",),
)


def _dequantize(q, k, v, descales, layout):
    """(B, H, N, D) float64 views of the dequantized q, k, v, written here from the contract:
    x.double() * descale[b, h_kv], q's heads h using the descale of their KV head h // group."""
    q, k, v = (to_bhsd(t, layout).double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    out = []
    for t, descale, repeat in zip((q, k, v), descales, (group, 1, 1)):
        if descale is not None:
            t = t * descale.double().repeat_interleave(repeat, dim=1)[:, :, None, None]
        out.append(t)
    return out


def _exact_fp8_attention(q, k, v, problem, descales):
    """float64 attention of the dequantized inputs (bottom-right causal, GQA): out (B, Hq, Nq, D)
    float64 and LSE (B, Hq, Nq) float64, rows with no key 0 and -inf."""
    q, k, v = _dequantize(q, k, v, descales, problem.layout)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * problem.scale
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if problem.causal:
        visible = torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
        scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)
    out = torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v
    return out, lse


class ExactFp8(Backend):
    """A correct FP8 backend without the FP8 arithmetic: float64 math on the dequantized inputs,
    out rounded to bfloat16 (the contract's output dtype for float8 inputs)."""

    name, support = "fake-fp8-exact", FP8_SUPPORT

    def _exact(self, q, k, v, problem, descales):
        return _exact_fp8_attention(q, k, v, problem, descales)

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        out, lse = self._exact(q, k, v, problem, descales)
        return from_bhsd(out.to(torch.bfloat16), problem.layout), lse.float()


class TenTimesTheBaselineError(ExactFp8):
    """A kernel whose rounding is ten times coarser than plain FP8 math's: the exact result plus
    10 x (baseline - exact), the baseline being the suite's own FP8 plain math."""

    name = "fake-fp8-10x"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        exact, lse = self._exact(q, k, v, problem, descales)
        base = _plain_fp8_out(q, k, v, problem, descales)
        out = exact + 10 * (base - exact)
        return from_bhsd(out.to(torch.bfloat16), problem.layout), lse.float()


class ForgetsVDescale(ExactFp8):
    """Applies the q and k descales but not v's."""

    name = "fake-fp8-forgets-v-descale"

    def _exact(self, q, k, v, problem, descales):
        return super()._exact(q, k, v, problem, (descales[0], descales[1], None))


class WrongQDescaleHead(ExactFp8):
    """Gives query head h the descale of KV head h % Hkv instead of h // group."""

    name = "fake-fp8-wrong-q-descale-head"

    def _exact(self, q, k, v, problem, descales):
        q_descale, k_descale, v_descale = descales
        group = problem.group_size
        # Pre-multiply q by the wrong descale, then pass no q descale.
        wrong = q_descale.repeat(1, group)[:, :, None, None].double()
        q = from_bhsd(to_bhsd(q, problem.layout).double() * wrong, problem.layout)
        return super()._exact(q, k, v, problem, (None, k_descale, v_descale))


class Log2Lse(ExactFp8):
    """Returns the LSE in base 2 (what exp2-based kernels keep internally)."""

    name = "fake-fp8-log2-lse"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        out, lse = super().forward(q, k, v, problem, cu_seqlens_q, cu_seqlens_k, descales)
        return out, lse / math.log(2)


class ReadsPastEnd(ExactFp8):
    """Reads one key row past the end of k and v and masks its score to -inf: 0 * NaN is NaN."""

    name = "fake-fp8-reads-past-end"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        out, lse = self._exact(q, k, v, problem, descales)
        vb = to_bhsd(v, problem.layout)
        past_end = vb.storage_offset() + vb.shape[2] * vb.stride(2)
        extra = vb.as_strided(vb.shape[:2] + (1, vb.shape[-1]), vb.stride(), past_end)
        extra = extra.double().repeat_interleave(problem.group_size, dim=1)
        out = out + 0.0 * extra  # the masked key's weight (0) times what lies past the end
        return from_bhsd(out.to(torch.bfloat16), problem.layout), lse.float()


def _plain_fp8_out(q, k, v, problem, descales, p_dtype=FP8):
    """Plain FP8 math written here: float32 scores of the dequantized inputs, P = exp(s - max)
    rounded to `p_dtype`, (P V) / rowsum(P) in float32; (B, Hq, Nq, D) float64."""
    q, k, v = (t.float() for t in _dequantize(q, k, v, descales, problem.layout))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * problem.scale
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if problem.causal:
        visible = torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
        scores = scores.masked_fill(~visible, -math.inf)
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == -math.inf, 0.0, top)
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    out = (p.to(p_dtype).float() @ v) / torch.where(total > 0, total, 1.0)
    return out.to(torch.bfloat16).double()


def _fp8_results(backend, tier="fast"):
    generated = cases(backend, tier, "cpu")
    assert generated and all(c.dtype == FP8 for c in generated)
    return [check_case(backend, c, "cpu", fp8_on_cpu=True) for c in generated]


# 1. Case generation


def test_an_fp8_backend_gets_fp8_cases_covering_its_declaration():
    for tier in ("fast", "full"):
        generated = cases(ExactFp8(), tier, "cuda")
        assert generated, tier
        # Only FP8 cases: the backend runs no native precision, so fp16/bf16 cases would all be refused.
        assert all(c.dtype == FP8 and c.id.startswith("fp8-") for c in generated)
        assert all(not c.backward and c.id.endswith("-fwd") for c in generated)  # FP8 is forward only
        assert len({c.id for c in generated}) == len(generated)
        assert {c.layout for c in generated} == {"bhsd", "bshd"}
        assert any(c.causal and c.seqlen_q < c.seqlen_k for c in generated)
        assert any(c.causal and c.seqlen_q > c.seqlen_k for c in generated)  # rows with no visible key
        assert {c.heads_q // c.heads_kv for c in generated} >= {1, 2, 8}
        assert any(c.causal and c.heads_q > c.heads_kv for c in generated)
        assert not any(c.window or c.softcap or c.varlen for c in generated)  # not declared, not generated
        assert all(c.head_dim == c.head_dim_v and c.head_dim % 64 == 0 for c in generated)
    assert {c.head_dim for c in cases(ExactFp8(), "fast", "cuda")} == {64}
    assert {c.head_dim for c in cases(ExactFp8(), "full", "cuda")} >= {64, 128, 256}


def test_native_backends_get_no_fp8_cases():
    for backend in REGISTRY.backends().values():
        if "fp8" in backend.support.precisions:
            continue
        assert not any(c.dtype == FP8 for c in cases(backend, "full", "cuda")), backend.name
        # Not even when float8 is asked for.
        assert not cases(backend, "fast", "cuda", [FP8]), backend.name
    # A native backend that declares the float8 dtype by mistake still gets none.
    class Native(ReferenceBackend):
        name, support = "native-with-fp8-dtype", dataclasses.replace(
            ReferenceBackend.support, dtypes=ReferenceBackend.support.dtypes + (FP8,))
    assert not any(c.dtype == FP8 for c in cases(Native(), "fast", "cpu"))


def test_a_backend_of_both_precisions_gets_both_and_dtypes_select():
    both = dataclasses.replace(FP8_SUPPORT, precisions=("native", "fp8"), dtypes=(torch.float16, FP8), backward=True)

    class Both(ExactFp8):
        name, support = "fake-both", both

    generated = cases(Both(), "fast", "cpu")
    assert {c.dtype for c in generated} == {torch.float16, FP8}
    assert all(c.backward for c in generated if c.dtype == torch.float16)
    assert not any(c.backward for c in generated if c.dtype == FP8)
    assert {c.dtype for c in cases(Both(), "fast", "cpu", [torch.float16])} == {torch.float16}
    assert {c.dtype for c in cases(Both(), "fast", "cpu", conformance.parse_dtypes("fp8"))} == {FP8}
    assert conformance.parse_dtypes("float8_e4m3fn,bf16") == (FP8, torch.bfloat16)


# 2. The reference, the baseline and the rule


def _fp8_case(**fields):
    from flashdispatch.conformance.cases import make_case

    return make_case(dtype=FP8, head_dim=64, **fields)


def test_fp8_inputs_are_quantized_with_random_descales_and_nan_padding():
    case = _fp8_case(seqlen_q=129, seqlen_k=128, heads_q=8, heads_kv=2, q_scale=8.0, layout="bshd")
    inputs = make_inputs(case, "cpu")
    fill_inputs(inputs, case)
    for name in ("q", "k", "v"):
        t = getattr(inputs, name)
        assert t.dtype == FP8 and torch.isfinite(t.float()).all()
        assert t.float().abs().max() > 1.0 and t.float().std() > 0.5  # random normal data, not zeros
        assert torch.isnan(inputs.buffers[name].float()).any()  # NaN padding past the end
    assert inputs.dout.dtype == torch.bfloat16
    assert inputs.q.float().abs().max() > 16  # q_scale 8
    for descale in inputs.descales:
        assert descale.dtype == torch.float32 and descale.shape == (2, 2)
        assert ((descale >= 0.5) & (descale < 1.5)).all() and descale.unique().numel() == 4
    # The same case gives the same data (the seed is the case's).
    again = make_inputs(case, "cpu")
    fill_inputs(again, case)
    assert torch.equal(again.q.view(torch.uint8), inputs.q.view(torch.uint8))
    assert torch.equal(again.descales[2], inputs.descales[2])


def test_fp8_reference_and_baseline_are_what_the_rule_says():
    for fields in (dict(seqlen_q=129, seqlen_k=128, heads_q=8, heads_kv=2, causal=True),
                   dict(seqlen_q=17, seqlen_k=128, heads_q=4, heads_kv=2, causal=True, layout="bshd"),
                   dict(seqlen_q=128, seqlen_k=17, causal=True)):
        case = _fp8_case(**fields)
        inputs = make_inputs(case, "cpu")
        fill_inputs(inputs, case)
        problem = build_problem(inputs.q, inputs.k, inputs.v, causal=case.causal, layout=case.layout,
                                precision="fp8", descales=inputs.descales)
        assert problem.precision == "fp8"
        ref, base = fp8_reference(case, problem, inputs), fp8_baseline(case, problem, inputs)
        out, lse = _exact_fp8_attention(inputs.q, inputs.k, inputs.v, problem, inputs.descales)
        want_ref = from_bhsd(out, case.layout)
        assert ref.out.dtype == torch.float64 and torch.allclose(ref.out, want_ref, atol=1e-12, rtol=0)
        assert torch.equal(ref.lse == -math.inf, lse == -math.inf)
        finite = lse != -math.inf
        assert torch.allclose(ref.lse[finite], lse[finite], atol=1e-12, rtol=0)
        assert base.out.dtype == torch.bfloat16 and base.lse.dtype == torch.float32
        plain = from_bhsd(_plain_fp8_out(inputs.q, inputs.k, inputs.v, problem, inputs.descales), case.layout)
        # Same math, other op order: at most one bfloat16 rounding step apart.
        assert (base.out.double() - plain).abs().max() <= 2 ** -7 * max(1.0, plain.abs().max().item())
        # The baseline's error is the FP8 rounding of P: far above float32 noise, far below the values.
        error = (base.out.double() - ref.out).abs().max().item()
        assert 1e-3 < error < 0.2 * ref.out.abs().max().item()
        # Without the descales, the result would be far off: they are applied.
        undescaled = fp8_reference(case, problem, dataclasses.replace(inputs, descales=(None, None, None)))
        assert (undescaled.out - ref.out).abs().max() > 5 * error


def test_the_exact_fp8_backend_passes_every_case():
    for tier in ("fast",):
        results = _fp8_results(ExactFp8(), tier)
        assert all(r.passed for r in results), "\n".join(r.message() for r in results if not r.passed)
        for r in results:
            names = {m.name for m in r.measurements}
            assert names == {"out", "lse"}, r.case.id
            out = next(m for m in r.measurements if m.name == "out")
            assert out.factor == 2.0
            # The floor is one bfloat16 eps at the data's scale (the output dtype's), not e4m3's.
            assert 2 ** -7 <= out.floor <= 2 ** -7 * 20


def test_ten_times_the_baseline_error_fails():
    results = _fp8_results(TenTimesTheBaselineError())
    failed = [r for r in results if r.failed]
    assert all(any(f.startswith("out:") for f in r.failures) for r in failed)
    # Every case where P's rounding matters (rows with more than one visible key and weights that
    # are not all equal) fails; cases whose FP8 baseline is exact but for the output's rounding
    # (one key, or scale 0: P = 1 everywhere) may pass: 10x one bfloat16 rounding can be within
    # 2x it plus one bfloat16 eps.
    expected = {r.case.id for r in results if r.case.seqlen_k > 1 and r.case.scale != 0.0}
    assert expected and expected <= {r.case.id for r in failed}, sorted(expected - {r.case.id for r in failed})
    assert len(failed) >= 0.8 * len(results)


def test_fp8_bugs_fail():
    forgets = _fp8_results(ForgetsVDescale())
    assert all(r.failed and any(f.startswith("out:") for f in r.failures) for r in forgets)
    wrong_head = _fp8_results(WrongQDescaleHead())
    expected = {r.case.id for r in wrong_head if r.case.heads_kv > 1 and r.case.heads_q > r.case.heads_kv}
    assert expected and {r.case.id for r in wrong_head if r.failed} == expected
    log2 = _fp8_results(Log2Lse())
    assert all(r.failed and [f[:4] for f in r.failures] == ["lse:"] for r in log2)
    reads = _fp8_results(ReadsPastEnd())
    assert all(r.failed and any("non-finite" in f for f in r.failures) for r in reads)


def test_fp8_outputs_are_poisoned_and_checked_for_dtype():
    class UninitialisedRows(ExactFp8):
        """Writes only the rows that see a key."""

        name = "fake-fp8-uninitialised"

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
            out, lse = self._exact(q, k, v, problem, descales)
            partial = torch.empty(out.shape, dtype=torch.bfloat16)
            seen = lse[0, 0] != -math.inf
            partial[:, :, seen] = out[:, :, seen].to(torch.bfloat16)
            return from_bhsd(partial, problem.layout), lse.float()

    class Float16Out(ExactFp8):
        name = "fake-fp8-float16-out"

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
            out, lse = super().forward(q, k, v, problem, cu_seqlens_q, cu_seqlens_k, descales)
            return out.half(), lse

    case = _fp8_case(seqlen_q=129, seqlen_k=17, causal=True)
    result = check_case(UninitialisedRows(), case, "cpu", fp8_on_cpu=True)
    assert result.failed and any("rows that see no key" in f for f in result.failures), result.message()
    result = check_case(Float16Out(), case, "cpu", fp8_on_cpu=True)
    assert result.failed and any("dtype torch.float16, expected torch.bfloat16" in f for f in result.failures)

    class ModifiesDescale(ExactFp8):
        name = "fake-fp8-modifies-descale"

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
            result = super().forward(q, k, v, problem, cu_seqlens_q, cu_seqlens_k, descales)
            descales[1].mul_(1.0 + 2 ** -20)
            return result

    result = check_case(ModifiesDescale(), case, "cpu", fp8_on_cpu=True)
    assert result.failed and any("modified its input k_descale" in f for f in result.failures)


# 3. The CPU skip


def test_fp8_cases_are_skipped_on_the_cpu_with_the_reason():
    backend = REGISTRY.get("fp8-hopper")
    generated = cases(backend, "fast", "cpu")
    assert generated and all(c.dtype == FP8 for c in generated)  # generated, not dropped
    for case in generated[:3] + generated[-2:]:
        result = check_case(backend, case, "cpu")
        assert result.skipped and not result.failed and result.skipped_by == "suite"
        assert result.reasons == [FP8_CPU_REASON] and "Triton's CPU interpreter" in result.reason
        assert "float8e4nv" in result.reason
    # The same for any FP8 backend unless asked otherwise, and in the report's summary.
    report = conformance.run([ExactFp8()], device="cpu")
    assert report.ok and {r.status for r in report.results} == {"skipped"}
    assert "(by the suite) FP8 cases are not run on a CPU device" in report.summary()
    report = conformance.run([ExactFp8()], device="cpu", fp8_on_cpu=True)
    assert report.ok and {r.status for r in report.results} == {"passed"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_cases_are_not_skipped_by_the_suite_on_cuda():
    result = check_case(ExactFp8Cuda(), cases(ExactFp8Cuda(), "fast", "cuda")[0], "cuda")
    assert result.skipped_by != "suite" and result.passed, result.message()


class ExactFp8Cuda(ExactFp8):
    """ExactFp8 on the device of its inputs."""

    name = "fake-fp8-exact-cuda"

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None, descales=(None, None, None)):
        device = q.device
        moved = [t.cpu() for t in (q, k, v)]
        out, lse = super().forward(*moved, problem, cu_seqlens_q, cu_seqlens_k,
                                   tuple(None if d is None else d.cpu() for d in descales))
        return out.to(device), lse.to(device)
