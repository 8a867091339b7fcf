"""The conformance suite in CI, and proof that it can fail.

1. The fast tier for the CPU backends (reference, tiled, sdpa-math) in float32, float16 and
   bfloat16, and for the Triton kernels in the interpreter in float32 and float16: one test per
   (backend, case).
2. Deliberately broken backends, each with one bug that real kernels have had, must FAIL the
   suite, and fail on the cases that exercise the bug (a suite that cannot fail is a defect).
3. The suite's own machinery: skipping with the backend's reasons, forward-only fallback,
   poisoning that leaves global state as it found it, the report and the environment settings.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flashdispatch import conformance
from flashdispatch.backends.base import visible_keys
from flashdispatch.backends.reference import SUPPORT as REFERENCE_SUPPORT
from flashdispatch.backends.reference import ReferenceBackend
from flashdispatch.conformance import Case, cases, check_case
from flashdispatch.dispatcher.registry import REGISTRY

CI_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 where there is
# no GPU), whose bfloat16 dots are wrong: bfloat16 is tested on the GPU.
CI_BACKENDS = {"reference": CI_DTYPES, "tiled": CI_DTYPES, "sdpa-math": CI_DTYPES,
               "triton": (torch.float32, torch.float16)}


def _ci_params():
    params = []
    for name, dtypes in CI_BACKENDS.items():
        for case in cases(REGISTRY.get(name), "fast", "cpu", dtypes):
            params.append(pytest.param(name, case, id=f"{name}-{case.id}"))
    return params


@pytest.mark.parametrize("name, case", _ci_params())
def test_fast_tier(name, case):
    result = check_case(REGISTRY.get(name), case, "cpu")
    assert not result.skipped, f"{name} refused a case generated from its own support: {result.reason}"
    assert result.passed, result.message()


def test_fast_tier_covers_the_contract():
    """The generated cases include what the issue asks for, for a backend that declares everything."""
    fast = cases(REGISTRY.get("reference"), "fast", "cpu", [torch.float16])
    full = cases(REGISTRY.get("reference"), "full", "cuda", [torch.float16])
    assert {c.head_dim for c in full} == set(conformance.HEAD_DIMS)
    lengths = {n for c in full if not c.varlen for n in (c.seqlen_q, c.seqlen_k)}
    assert {1, 17, 127, 128, 129, 1000} <= lengths
    for tier in (fast, full):
        assert any(c.seqlen_q < c.seqlen_k for c in tier) and any(c.seqlen_q > c.seqlen_k for c in tier)
        assert any(c.causal and c.seqlen_q > c.seqlen_k for c in tier)  # rows with no visible key
        assert {c.heads_q // c.heads_kv for c in tier} >= {1, 2, 8}
        assert any(c.causal and c.heads_q // c.heads_kv == 8 for c in tier)
        assert any(c.window and c.softcap for c in tier)
        assert any(c.varlen and c.causal and {0, 1} <= set(c.seqlens_q) for c in tier)
        assert {c.layout for c in tier} == {"bhsd", "bshd", "varlen"}
        assert all(c.backward for c in tier)
        assert len({c.id for c in tier}) == len(tier)
    assert max(max(c.seqlen_q, c.seqlen_k) for c in fast) <= 130 and max(c.head_dim for c in fast) <= 64
    # Seeds depend on the case alone, so every backend sees the same data for the same case.
    assert [c.seed for c in cases(REGISTRY.get("tiled"), "fast", "cpu", [torch.float16])][:5] == \
        [c.seed for c in fast][:5]


def test_the_second_gradient_baseline_is_exact_in_float64():
    """The FlashAttention-2 formula the rule uses as a second gradient baseline computes the right
    gradients (a wrong one would inflate every gradient tolerance and hide bugs)."""
    from flashdispatch.conformance.checks import fill_inputs, make_inputs
    from flashdispatch.conformance.oracle import attention_by_math, backward_from_state
    from flashdispatch.dispatcher.problem import build_problem

    generated = cases(REGISTRY.get("reference"), "fast", "cpu", [torch.float64])
    assert len(generated) > 40
    for case in generated:
        inputs = make_inputs(case, "cpu")
        fill_inputs(inputs, case)
        problem = build_problem(inputs.q, inputs.k, inputs.v, causal=case.causal, window=case.window,
                                softcap=case.softcap or None, layout="bhsd" if case.varlen else case.layout,
                                cu_seqlens_q=inputs.cu_seqlens_q, cu_seqlens_k=inputs.cu_seqlens_k)
        ref = attention_by_math(case, problem, inputs, torch.float64)
        for name, got, want in zip("dq dk dv".split(), backward_from_state(case, problem, inputs, ref.out, ref.lse,
                                                                          torch.float64), ref.grads):
            assert got.shape == want.shape and torch.isfinite(got).all(), (case.id, name)
            assert (got - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item()), (case.id, name)


# Broken backends. Each is the reference backend (float64 math, so any error is the bug's) with one
# bug; dense "bhsd" inputs only, to keep them short.

DENSE = dataclasses.replace(REFERENCE_SUPPORT, varlen=False, layouts=("bhsd",))
FORWARD_ONLY = dataclasses.replace(DENSE, backward=False, deterministic_backward=False)


def _scores_attention(q, k, v, scale, visible):
    """float64 attention of (B, H, N, D) tensors with an explicit (Nq, Nk) visibility mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)  # -inf for a row with no key
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


def _bottom_right(problem, seqlen_q, seqlen_k, device):
    visible = visible_keys(seqlen_q, seqlen_k, problem.window_left, problem.window_right, device)
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device) if visible is None else visible


def _has_rows_without_keys(case: Case) -> bool:
    left, right = case.window or (-1, -1)
    right = 0 if case.causal else right
    visible = visible_keys(case.seqlen_q, case.seqlen_k, left, right, "cpu")
    return visible is not None and not visible.any(-1).all()


class DropsLastKey(ReferenceBackend):
    """An off-by-one in the key loop bound."""

    name, support = "broken-drops-last-key", DENSE

    def _dense(self, q, k, v, problem, layout):
        return super()._dense(q, k[:, :, :-1], v[:, :, :-1], problem, layout)


class ForgetsRescale(ReferenceBackend):
    """Online softmax over blocks of 16 keys that rescales the output accumulator but not the
    running sum when the running maximum grows (the widely copied bug)."""

    name, support = "broken-forgets-rescale", FORWARD_ONLY
    block = 16

    def _dense(self, q, k, v, problem, layout):
        visible = _bottom_right(problem, q.shape[2], k.shape[2], q.device)
        group = q.shape[1] // k.shape[1]
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        row_max = torch.full(q.shape[:3] + (1,), -math.inf, dtype=torch.float64, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64, device=q.device)
        for start in range(0, k.shape[2], self.block):
            cols = slice(start, start + self.block)
            s = (q.double() @ k[:, :, cols].transpose(-1, -2)) * problem.scale
            s = s.masked_fill(~visible[:, cols], -math.inf)
            new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            p = torch.exp(s - shift)
            acc = acc * torch.exp(row_max - shift) + p @ v[:, :, cols]
            row_sum = row_sum + p.sum(-1, keepdim=True)  # BUG: not multiplied by exp(row_max - shift)
            row_max = new_max
        out = torch.where(row_sum > 0, acc / row_sum, 0.0)
        return out.to(q.dtype), (row_max + torch.log(row_sum)).squeeze(-1).float()


class UninitialisedMaskedRows(ReferenceBackend):
    """Writes only the rows that see a key and leaves the others as torch.empty gave them."""

    name, support = "broken-uninitialised-rows", DENSE

    def _dense(self, q, k, v, problem, layout):
        out, lse = super()._dense(q, k, v, problem, layout)
        has_key = _bottom_right(problem, q.shape[2], k.shape[2], q.device).any(-1)
        partial = torch.empty_like(out)
        partial[:, :, has_key] = out[:, :, has_key]
        return partial, lse


class ReadsPastEnd(ReferenceBackend):
    """Loads a whole tile of keys and values including one row past the end, and masks the extra
    key's score to -inf: its probability is 0, but 0 * (whatever lies there) is not always 0."""

    name, support = "broken-reads-past-end", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        (batch, heads, seqlen_k, _), shape_v = k.shape, v.shape
        k_tile = k.as_strided((batch, heads, seqlen_k + 1, k.shape[-1]), k.stride(), k.storage_offset())
        v_tile = v.as_strided((batch, heads, seqlen_k + 1, shape_v[-1]), v.stride(), v.storage_offset())
        visible = torch.zeros(q.shape[2], seqlen_k + 1, dtype=torch.bool, device=q.device)
        visible[:, :seqlen_k] = _bottom_right(problem, q.shape[2], seqlen_k, q.device)
        out, lse = _scores_attention(q, k_tile, v_tile, problem.scale, visible)
        return out.to(q.dtype), lse.float()


class Log2Lse(ReferenceBackend):
    """Returns the LSE in base 2 (what exp2-based kernels keep internally)."""

    name, support = "broken-log2-lse", DENSE

    def _dense(self, q, k, v, problem, layout):
        out, lse = super()._dense(q, k, v, problem, layout)
        return out, lse / math.log(2)


class TopLeftCausal(ReferenceBackend):
    """Aligns the causal mask top-left (PyTorch's is_causal) while declaring bottom-right support."""

    name, support = "broken-top-left-causal", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
        if not problem.causal or seqlen_q == seqlen_k:  # the alignments agree
            return super()._dense(q, k, v, problem, layout)
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril()
        out, lse = _scores_attention(q, k, v, problem.scale, visible)
        return out.to(q.dtype), lse.float()


class IgnoresSoftcap(ReferenceBackend):
    name, support = "broken-ignores-softcap", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        return super()._dense(q, k, v, dataclasses.replace(problem, softcap=0.0), layout)


class WrongGqaHeads(ReferenceBackend):
    """Maps query head h to key head h % Hkv (tile) instead of h // G (repeat_interleave)."""

    name, support = "broken-gqa-heads", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        group = q.shape[1] // k.shape[1]
        return super()._dense(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), problem, layout)


class ScalesQInPlace(ReferenceBackend):
    """Pre-scales q in place: right answer, but the caller's q is changed."""

    name, support = "broken-modifies-q", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        q.mul_(problem.scale)
        return super()._dense(q, k, v, dataclasses.replace(problem, scale=1.0), layout)


class NaNGradsForMaskedRows(ReferenceBackend):
    """A correct forward, and a backward by autograd through softmax(-inf row), which is NaN."""

    name, support = "broken-nan-grads", dataclasses.replace(DENSE, softcap=False)

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        with torch.enable_grad():
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            group = q.shape[1] // k.shape[1]
            kk, vv = (t.repeat_interleave(group, 1) for t in leaves[1:])
            scores = (leaves[0] @ kk.transpose(-1, -2)) * problem.scale
            scores = scores.masked_fill(~_bottom_right(problem, q.shape[2], k.shape[2], q.device), -math.inf)
            recomputed = torch.softmax(scores, -1) @ vv
            grads = torch.autograd.grad(recomputed, leaves, dout.double())
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


class NondeterministicBackward(ReferenceBackend):
    """Declares a deterministic backward, but every other run differs in the last bit of its
    largest gradient element (an atomic-add race): within tolerance, yet not bit-identical."""

    name, support = "broken-nondeterministic", DENSE
    calls = 0

    def backward(self, dout, q, k, v, out, lse, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        grads = list(super().backward(dout, q, k, v, out, lse, problem, cu_seqlens_q, cu_seqlens_k))
        self.calls += 1
        if self.calls % 2 == 0:
            i = max(range(3), key=lambda j: grads[j].abs().max().item())
            grads[i] = grads[i].contiguous().clone()
            bits = grads[i].view({2: torch.int16, 4: torch.int32}[grads[i].element_size()]).view(-1)
            bits[grads[i].abs().argmax()] ^= 1
        return tuple(grads)


class Tf32ForFloat32(ReferenceBackend):
    """Runs float32 inputs through TF32-like arithmetic (10 mantissa bits, as tensor cores do when
    allow_tf32 is on): an accuracy bug, not a crash."""

    name, support = "broken-tf32", FORWARD_ONLY

    def _dense(self, q, k, v, problem, layout):
        rounded = (t.to(torch.float16).to(t.dtype) if t.dtype == torch.float32 else t for t in (q, k, v))
        return super()._dense(*rounded, problem, layout)


def _results(backend, dtypes=(torch.float32,)):
    return [check_case(backend, case, "cpu") for case in cases(backend, "fast", "cpu", dtypes)]


def _ran(results):
    ran = [r for r in results if not r.skipped]
    assert ran, "no case ran"
    return ran


def test_reference_subclass_without_bugs_passes():
    """The broken backends below differ from this one by their bug alone."""

    class Dense(ReferenceBackend):
        name, support = "dense-reference", DENSE

    results = _ran(_results(Dense()))
    assert all(r.passed for r in results), "\n".join(r.message() for r in results if not r.passed)


def test_drops_last_key_fails_everywhere():
    results = _ran(_results(DropsLastKey()))
    assert all(r.failed for r in results), [r.case.id for r in results if not r.failed]


def test_forgetting_the_rescale_fails_with_more_than_one_block():
    results = _ran(_results(ForgetsRescale()))
    failed = [r for r in results if r.failed]
    assert len(failed) >= len(results) // 2
    assert all(any(f.startswith(("out:", "lse:")) for f in r.failures) for r in failed)
    # With at most one block of keys there is nothing to rescale: those cases pass.
    assert all(r.passed for r in results if r.case.seqlen_k <= ForgetsRescale.block)
    assert any(r.failed and r.case.q_scale > 1 for r in results)


def test_uninitialised_rows_fail_exactly_where_rows_see_no_key():
    results = _ran(_results(UninitialisedMaskedRows()))
    expected = {r.case.id for r in results if _has_rows_without_keys(r.case)}
    assert expected, "the fast tier must have cases with rows that see no key"
    assert {r.case.id for r in results if r.failed} == expected
    assert all(any("rows that see no key" in f for f in r.failures) for r in results if r.failed)


def test_reading_past_the_end_fails_on_the_nan_padding():
    results = _ran(_results(ReadsPastEnd()))
    assert all(r.failed for r in results)
    assert all(any("non-finite" in f or "not -inf" in f for f in r.failures) for r in results)


def test_lse_in_base_2_fails():
    results = _ran(_results(Log2Lse()))
    assert all(r.failed and any(f.startswith("lse") for f in r.failures) for r in results)


def test_top_left_causal_fails_on_unequal_lengths_only():
    results = _ran(_results(TopLeftCausal()))
    failed = {r.case.id for r in results if r.failed}
    # Causal with one query hides no key: the problem drops that mask, so either alignment is right.
    expected = {r.case.id for r in results
                if r.case.causal and r.case.seqlen_q != r.case.seqlen_k and r.case.seqlen_q > 1}
    assert failed == expected


def test_ignoring_softcap_fails_on_softcap_cases():
    results = _ran(_results(IgnoresSoftcap()))
    assert {r.case.id for r in results if r.failed} == {r.case.id for r in results if r.case.softcap}


def test_wrong_gqa_head_mapping_fails_when_there_are_several_kv_heads():
    results = _ran(_results(WrongGqaHeads()))
    expected = {r.case.id for r in results if r.case.heads_kv > 1 and r.case.heads_q > r.case.heads_kv}
    assert expected and {r.case.id for r in results if r.failed} == expected


def test_modifying_an_input_fails():
    results = _ran(_results(ScalesQInPlace()))
    assert all(r.failed and any("modified its input q" in f for f in r.failures) for r in results)


def test_nan_gradients_of_rows_without_keys_fail():
    results = _ran(_results(NaNGradsForMaskedRows()))
    failed = {r.case.id for r in results if r.failed}
    assert failed and failed == {r.case.id for r in results if _has_rows_without_keys(r.case)}
    # masked_fill's gradient zeroes dq's NaN; dv = P^T dO keeps it.
    assert all(any(f.startswith("dv") and "non-finite" in f for f in r.failures) for r in results if r.failed)


def test_nondeterministic_backward_fails_the_determinism_check_only():
    results = _ran(_results(NondeterministicBackward()))
    for r in results:
        assert r.failed, r.case.id
        assert all("differs bitwise" in f for f in r.failures), r.message()


def test_tf32_arithmetic_fails_the_float32_rule():
    """float32's wider tolerance (8x plain float32 math) still leaves no room for 10-bit mantissas."""
    results = _ran(_results(Tf32ForFloat32()))
    assert all(r.failed and any(f.startswith("out:") for f in r.failures) for r in results)


# The machinery


class Picky(ReferenceBackend):
    """Declares no softcap, refuses some cases in its own words, and has no backward for D > 32."""

    name, support = "picky", dataclasses.replace(DENSE, softcap=False)

    def extra_reasons(self, problem, caps):
        return ["picky refuses 17 queries"] if problem.seqlen_q == 17 else []

    def backward_not_supported_reasons(self, problem, caps):
        extra = ["picky has no backward for head_dim > 32"] if problem.head_dim > 32 else []
        return extra + super().backward_not_supported_reasons(problem, caps)


def test_cases_follow_the_declared_support_and_skips_give_the_backends_reasons():
    backend = Picky()
    generated = cases(backend, "fast", "cpu", [torch.float32, torch.float64])
    assert not any(c.softcap or c.varlen or c.layout == "bshd" for c in generated)  # not declared: not generated
    assert {c.dtype for c in generated} == {torch.float32, torch.float64}  # float64 when asked for
    assert torch.float64 not in {c.dtype for c in cases(backend, "fast", "cpu")}  # and only then
    results = [check_case(backend, c, "cpu") for c in generated if c.dtype == torch.float32]
    skipped = [r for r in results if r.skipped]
    assert skipped and all(r.case.seqlen_q == 17 for r in skipped)
    assert all(r.reason == "picky refuses 17 queries" for r in skipped), skipped[0].reason
    forward_only = [r for r in results if r.passed and r.notes]
    assert forward_only and all(r.case.head_dim > 32 for r in forward_only)
    assert all("picky has no backward for head_dim > 32" in r.notes[0] for r in forward_only)
    assert all(not any(m.name.startswith("d") for m in r.measurements) for r in forward_only)


def test_a_backend_for_another_device_gets_one_skipped_case_per_dtype():
    flash = REGISTRY.get("sdpa-flash")
    generated = cases(flash, "fast", "cpu")
    assert len(generated) == len(flash.support.dtypes)
    if not torch.cuda.is_available():
        result = check_case(flash, generated[0], "cpu")
        assert result.skipped and "not cpu" in result.reason


def test_a_raising_backend_fails_and_poisoning_restores_global_state():
    class Raises(ReferenceBackend):
        name, support = "raises", FORWARD_ONLY

        def forward(self, *args, **kwargs):
            assert torch.are_deterministic_algorithms_enabled()  # poisoned() is on while it runs
            assert torch.empty(4).isnan().all()
            raise RuntimeError("kernel launch failed")

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
              torch.get_num_threads())
    result = check_case(Raises(), cases(Raises(), "fast", "cpu", [torch.float32])[0], "cpu")
    assert result.failed and "forward raised RuntimeError: kernel launch failed" in result.failures[0]
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
            torch.get_num_threads()) == before


def test_run_report_and_summary():
    lines = []
    report = conformance.run([DropsLastKey(), "reference"], device="cpu", dtypes="fp32", on_result=lines.append)
    counts = report.counts()
    assert set(counts) == {"broken-drops-last-key", "reference"} and not report.ok
    assert counts["broken-drops-last-key"]["failed"] > 0 and len(lines) == len(report.results)
    summary = report.summary()
    assert "broken-drops-last-key" in summary and "FAILED" in summary and "worst err/tol" in summary
    assert str(lines[0]).startswith("FAILED  broken-drops-last-key")
    with pytest.raises(ValueError, match="tier"):
        conformance.run(["reference"], device="cpu", tier="huge")


def test_settings_from_env():
    settings = conformance.settings_from_env({
        "FLASHDISPATCH_VERIFY_BACKENDS": "tiled, sdpa-math", "FLASHDISPATCH_VERIFY_DEVICE": "cpu",
        "FLASHDISPATCH_VERIFY_TIER": "full", "FLASHDISPATCH_VERIFY_DTYPES": "bf16,float32"})
    assert settings == dict(backends="tiled, sdpa-math", device="cpu", tier="full",
                            dtypes=(torch.bfloat16, torch.float32))
    assert [b.name for b in conformance.resolve_backends(settings["backends"])] == ["tiled", "sdpa-math"]
    assert conformance.settings_from_env({}) == dict(backends=None, device=None, tier="fast", dtypes=None)
    with pytest.raises(ValueError, match="FLASHDISPATCH_VERIFY_TIER"):
        conformance.settings_from_env({"FLASHDISPATCH_VERIFY_TIER": "slow"})
    with pytest.raises(ValueError, match="dtype"):
        conformance.parse_dtypes("float8")



def test_shards_partition_the_cases_by_whole_dtype_and_head_dim_groups():
    everything = cases(ReferenceBackend(), "full", "cpu")
    parts = [conformance.shard_of(everything, (i, 4)) for i in range(4)]
    ids = [c.id for part in parts for c in part]
    assert sorted(ids) == sorted(c.id for c in everything) and len(ids) == len(set(ids))
    owner = {}
    for i, part in enumerate(parts):
        assert part, "every shard gets work"
        for c in part:
            assert owner.setdefault((c.dtype, c.head_dim, c.head_dim_v), i) == i
    with pytest.raises(ValueError, match="shard"):
        conformance.shard_of(everything, (4, 4))


def test_verify_rejects_a_malformed_shard(capsys):
    from flashdispatch.cli import main

    with pytest.raises(SystemExit):
        main(["verify", "--shard", "3of4"])
    assert "expected I/N" in capsys.readouterr().err
