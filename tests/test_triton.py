"""The Triton backend's launcher and tuner, on the CPU (kernels in Triton's interpreter).

The kernels' exactness is the conformance suite's job (tests/test_conformance.py); here: the
split-KV decoding path and its merge kernel, the tuner's buckets and choices, the configuration
knobs, and what explain() says about the tuner.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from flashdispatch import attention, explain  # noqa: E402
from flashdispatch.backends.reference import attention_math  # noqa: E402
from flashdispatch.backends.triton import TritonBackend, kernels  # noqa: E402
from flashdispatch.backends.triton import configs  # noqa: E402
from flashdispatch.backends import triton as triton_backend  # noqa: E402
from flashdispatch.dispatcher.capabilities import capabilities  # noqa: E402
from flashdispatch.dispatcher.problem import build_problem  # noqa: E402


class _Counting:
    """Wraps a Triton kernel, counting launches (`kernel[grid](...)`)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("seqlen_q", [1, 5, 16])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_decoding_splits_the_keys_and_merges_them_exactly(monkeypatch, seqlen_q, mask):
    merge = _Counting(kernels.merge_splits)
    monkeypatch.setattr(kernels, "merge_splits", merge)
    monkeypatch.setattr(triton_backend, "DECODE_PROGRAMS_PER_SM", 64)  # split even on a one-core machine
    gen = torch.Generator().manual_seed(seqlen_q)
    q = torch.randn(2, 8, seqlen_q, 32, generator=gen, dtype=torch.float16)
    k = torch.randn(2, 2, 300, 32, generator=gen, dtype=torch.float16)
    v = torch.randn(2, 2, 300, 32, generator=gen, dtype=torch.float16)
    options = dict(causal=mask == "causal", window=(40, 0) if mask == "window" else None)
    out, lse = attention(q, k, v, backend="triton", return_lse=True, **options)
    assert merge.launches == 1, "300 keys in blocks of 64 must be split across programs, then merged"
    problem = build_problem(q, k, v, **options)
    ref, ref_lse = attention_math(q, k, v, scale=problem.scale, window_left=problem.window_left,
                                  window_right=problem.window_right)
    assert (out.double() - ref).abs().max() < 4e-3
    assert (lse.double() - ref_lse).abs().max() < 1e-4


def test_length_buckets_group_lengths_within_a_factor_of_four():
    assert [configs._length_bucket(n) for n in (1, 1024, 1025, 4096, 4097, 16384, 70000)] == [
        1024, 1024, 4096, 4096, 16384, 16384, 262144]


def test_every_candidate_configuration_is_well_formed():
    for kernel in configs.KERNELS:
        for generation in ("sm80", "sm90"):
            for dim_class in ("64", "128", "256"):
                options = configs.CANDIDATES[(kernel, generation, dim_class)]
                assert options and len(set(options)) == len(options)
                for c in options:
                    assert c.block_m >= 16 and c.block_m & (c.block_m - 1) == 0, (kernel, c)
                    assert c.block_n >= 16 and c.block_n & (c.block_n - 1) == 0, (kernel, c)
                    assert c.num_warps in (1, 2, 4, 8) and c.num_stages >= 1, (kernel, c)


def test_forced_configurations_are_parsed_and_bad_ones_named(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=128,64,8,3,tma; dq=64,32,4,2")
    assert configs._forced() == {"forward": configs.Config(128, 64, 8, 3, tma=True), "dq": configs.Config(64, 32, 4, 2)}
    for bad in ("fwd=128,64,8,3", "forward=128,64,8", "forward=a,b,c,d", "forward=128,64,8,3,fast"):
        monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match="FLASHDISPATCH_TRITON_CONFIG"):
            configs._forced()


class _FakeTimedTuner(configs.Tuner):
    """A tuner whose timings are given, so the choosing logic runs without a GPU."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.first_runs = []

    def _compile_all(self, launch, options):
        self.compiled = list(options)

    def _first_run(self, launch, config):
        self.first_runs.append(config)
        if self.seconds[config] is None:
            raise RuntimeError("out of resource: shared memory")
        return 0.5

    def _median_seconds(self, launch, config):
        return self.seconds[config]


def _problem(seqlen, causal=False, dtype=torch.float16):
    q = torch.empty(1, 4, seqlen, 64, dtype=dtype)
    return build_problem(q, q, q, causal=causal)


def test_tuner_keeps_the_fastest_candidate_per_bucket(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    caps = capabilities(torch.device("cpu"))
    options = [configs.Config(128, 64, 4, 3), configs.Config(64, 64, 4, 3), configs.Config(128, 128, 8, 3)]
    monkeypatch.setattr(configs, "candidates", lambda kernel, problem, caps: options)
    tuner = _FakeTimedTuner({options[0]: 3e-3, options[1]: 1e-3, options[2]: None})
    chosen = tuner.choose("forward", _problem(3000), caps, launch=None)
    assert chosen == options[1]  # fastest; the one that failed to run is skipped
    assert tuner.compiled == options  # all compiled together before the timing runs
    assert "tuned over 3 candidates" in tuner.known("forward", _problem(3000), caps).how
    # Same bucket (a new length within it): no new tuning. Another bucket or a mask: tuned again.
    tuner.first_runs.clear()
    assert tuner.choose("forward", _problem(2000), caps, launch=None) == options[1]
    assert tuner.first_runs == []
    tuner.choose("forward", _problem(5000), caps, launch=None)
    tuner.choose("forward", _problem(3000, causal=True), caps, launch=None)
    assert len(tuner.first_runs) == 6


def test_tuner_takes_the_first_candidate_when_autotuning_is_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FLASHDISPATCH_TRITON_AUTOTUNE", "0")
    caps = capabilities(torch.device("cpu"))
    options = [configs.Config(128, 64, 4, 3), configs.Config(64, 64, 4, 3)]
    monkeypatch.setattr(configs, "candidates", lambda kernel, problem, caps: options)
    tuner = _FakeTimedTuner({options[0]: 3e-3, options[1]: 1e-3})
    assert tuner.choose("dq", _problem(100), caps, launch=None) == options[0]
    assert tuner.first_runs == [options[0]]
    assert "autotuning off" in tuner.known("dq", _problem(100), caps).how


def test_explain_shows_the_tuner_state_of_the_chosen_triton_kernels():
    configs.TUNER.clear()
    q = torch.randn(1, 2, 40, 32, dtype=torch.float16, requires_grad=True)
    before = str(explain(q, q, q, causal=True, backend="triton"))
    assert "note    : triton: forward kernel: not run yet in this shape bucket" in before
    assert "note    : triton: dq kernel: not run yet" in before
    attention(q, q, q, causal=True, backend="triton").sum().backward()
    after = str(explain(q, q, q, causal=True, backend="triton"))
    assert "note    : triton: forward kernel: BLOCK_M=64 BLOCK_N=64" in after
    assert "dkdv kernel: BLOCK_M=64 BLOCK_N=64 warps=4 stages=1 (the interpreter's configuration)" in after


def test_notes_of_a_backend_that_raises_do_not_break_explain(monkeypatch):
    def broken(self, problem, caps):
        raise RuntimeError("boom")

    monkeypatch.setattr(TritonBackend, "notes", broken)
    q = torch.randn(1, 2, 8, 32, dtype=torch.float16)
    assert "its notes() raised RuntimeError: boom" in str(explain(q, q, q, backend="triton"))


def test_tuned_choices_are_saved_and_reused_by_a_new_process(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    caps = capabilities(torch.device("cpu"))
    options = [configs.Config(128, 64, 4, 3), configs.Config(64, 64, 4, 3)]
    monkeypatch.setattr(configs, "candidates", lambda kernel, problem, caps: options)
    first = _FakeTimedTuner({options[0]: 3e-3, options[1]: 1e-3})
    assert first.choose("dkdv", _problem(4000), caps, launch=None) == options[1]
    assert (tmp_path / "flashdispatch-cache" / "triton-tuning.json").exists()
    later = _FakeTimedTuner({options[0]: 1e-3, options[1]: 3e-3})  # a new process: nothing in memory
    assert later.choose("dkdv", _problem(4000), caps, launch=None) == options[1]
    assert later.first_runs == [], "a saved choice needs no compiling of the other candidates, no timing"
    assert "tuned on an earlier run" in later.known("dkdv", _problem(4000), caps).how
    # A saved choice that is no longer a candidate (the lists changed) is tuned again.
    monkeypatch.setattr(configs, "candidates", lambda kernel, problem, caps: options[:1] + [configs.Config(32, 32, 4, 2)])
    again = _FakeTimedTuner({options[0]: 1e-3, configs.Config(32, 32, 4, 2): 3e-3})
    assert again.choose("dkdv", _problem(4000), caps, launch=None) == options[0]
    assert len(again.first_runs) == 2


def test_an_unusable_cache_folder_costs_only_a_retuning(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLASHDISPATCH_CACHE_DIR", str(blocker))
    caps = capabilities(torch.device("cpu"))
    options = [configs.Config(128, 64, 4, 3), configs.Config(64, 64, 4, 3)]
    monkeypatch.setattr(configs, "candidates", lambda kernel, problem, caps: options)
    assert _FakeTimedTuner({options[0]: 1e-3, options[1]: 3e-3}).choose("dq", _problem(64), caps, None) == options[0]
    monkeypatch.setenv("FLASHDISPATCH_CACHE_DIR", str(tmp_path / "corrupt"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "triton-tuning.json").write_text("{not json")
    tuner = _FakeTimedTuner({options[0]: 3e-3, options[1]: 1e-3})
    assert tuner.choose("dq", _problem(64), caps, None) == options[1]
    assert len(tuner.first_runs) == 2


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "varlen"])
def test_tma_descriptor_loads_give_the_plain_loads_results(monkeypatch, layout):
    built = []
    real = triton_backend._descriptors
    monkeypatch.setattr(triton_backend, "_descriptors", lambda *a: built.append(real(*a)) or built[-1])
    gen = torch.Generator().manual_seed(7)
    lengths = [50, 130, 17]
    if layout == "varlen":
        q = torch.randn(sum(lengths), 4, 64, generator=gen, dtype=torch.float16)
        k = torch.randn(sum(lengths), 2, 64, generator=gen, dtype=torch.float16)
        cu = torch.tensor([0, 50, 180, 197], dtype=torch.int32)
        options = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=130, max_seqlen_k=130)
    else:
        shape_q, shape_k = ((2, 4, 130, 64), (2, 2, 150, 64)) if layout == "bhsd" else ((2, 130, 4, 64), (2, 150, 2, 64))
        q = torch.randn(shape_q, generator=gen, dtype=torch.float16)
        k = torch.randn(shape_k, generator=gen, dtype=torch.float16)
        options = dict(layout=layout)
    v = torch.randn_like(k)
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=64,32,4,1")
    plain = attention(q, k, v, causal=True, backend="triton", **options)
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "forward=64,32,4,1,tma")
    through_tma = attention(q, k, v, causal=True, backend="triton", **options)
    assert built and built[-1] is not None, "contiguous 16-byte-aligned K and V must get descriptors"
    assert torch.equal(plain, through_tma)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decoding_through_tma_descriptors_gives_the_plain_loads_results(monkeypatch, layout):
    monkeypatch.setattr(triton_backend, "DECODE_PROGRAMS_PER_SM", 64)  # split and merge on a one-core machine
    gen = torch.Generator().manual_seed(11)
    shape_q, shape_k = ((2, 8, 3, 64), (2, 2, 300, 64)) if layout == "bhsd" else ((2, 3, 8, 64), (2, 300, 2, 64))
    q = torch.randn(shape_q, generator=gen, dtype=torch.float16)
    k, v = (torch.randn(shape_k, generator=gen, dtype=torch.float16) for _ in range(2))
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "decode=16,64,4,1")
    plain = attention(q, k, v, causal=True, layout=layout, backend="triton")
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", "decode=16,64,4,1,tma")
    assert torch.equal(plain, attention(q, k, v, causal=True, layout=layout, backend="triton"))


def test_tma_is_not_used_where_strides_or_head_dims_do_not_allow_it():
    from flashdispatch.backends.triton import _descriptors

    config = configs.Config(64, 64, 4, 1, tma=True)
    q = torch.randn(1, 2, 64, 40, dtype=torch.float16)  # head dim 40: a 64-wide tile would overhang
    assert _descriptors(q, q, build_problem(q, q, q), config) is None
    wide = torch.randn(1, 2, 64, 67, dtype=torch.float16)[..., :64]  # rows 134 bytes apart: unaligned
    assert _descriptors(wide, wide, build_problem(wide, wide, wide), config) is None
    dense = torch.randn(1, 2, 64, 64, dtype=torch.float16)
    assert _descriptors(dense, dense, build_problem(dense, dense, dense), config) is not None


# On the GPU (skipped elsewhere): what the CPU interpreter cannot show.


def _reference_error(out, q, k, v, **options):
    problem = build_problem(q, k, v, **options)
    ref, _ = attention_math(q, k, v, scale=problem.scale, window_left=problem.window_left,
                            window_right=problem.window_right, softcap=problem.softcap or 0.0)
    return (out.double() - ref).abs().max().item()


@pytest.mark.gpu
def test_gpu_backward_is_bit_identical_run_to_run():
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 900, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 900, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(attention(q, k, v, causal=True, backend="triton"), (q, k, v), dout) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("kernel, config, batch, heads, seqlen_q, seqlen_k, causal", [
    ("forward", "128,64,8,3", 2, (8, 2), 1000, 1100, True),
    ("decode", "16,128,4,2", 8, (32, 8), 1, 5000, False),
])
def test_gpu_tma_loads_give_the_plain_loads_results(monkeypatch, layout, kernel, config, batch, heads, seqlen_q,
                                                     seqlen_k, causal):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor descriptors need compute capability 9.0")
    (hq, hkv), d = heads, 128
    shape_q, shape_k = (batch, hq, seqlen_q, d), (batch, hkv, seqlen_k, d)
    if layout == "bshd":
        shape_q, shape_k = (batch, seqlen_q, hq, d), (batch, seqlen_k, hkv, d)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape_k, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", f"{kernel}={config}")
    plain = attention(q, k, v, causal=causal, layout=layout, backend="triton")
    monkeypatch.setenv("FLASHDISPATCH_TRITON_CONFIG", f"{kernel}={config},tma")
    assert torch.equal(plain, attention(q, k, v, causal=causal, layout=layout, backend="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q", [1, 4, 16])
def test_gpu_split_decoding_matches_the_reference(seqlen_q):
    q = torch.randn(2, 8, seqlen_q, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 5000, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = attention(q, k, v, causal=True, backend="triton")
    plain_torch = attention(q, k, v, causal=True, backend="sdpa-math")
    assert _reference_error(out, q, k, v, causal=True) <= 2 * _reference_error(plain_torch, q, k, v, causal=True) + 1e-3


@pytest.mark.gpu
def test_gpu_first_call_tunes_reports_and_saves_for_the_next_process(monkeypatch):
    configs.TUNER.clear()
    q = torch.randn(1, 4, 3000, 64, device="cuda", dtype=torch.float16)
    attention(q, q, q, backend="triton")
    notes = str(explain(q, q, q, backend="triton"))
    assert "forward kernel:" in notes and "tuned over" in notes and "compiling" in notes
    monkeypatch.setattr(configs, "TUNER", configs.Tuner())  # a new process: nothing in memory
    monkeypatch.setattr(triton_backend, "TUNER", configs.TUNER)
    attention(q, q, q, backend="triton")
    assert "tuned on an earlier run" in str(explain(q, q, q, backend="triton"))


def test_refuses_what_its_kernels_cannot_launch_with_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = TritonBackend()
    caps = capabilities(torch.device("cpu"))
    many_heads = torch.empty(2, 40000, 1, 64, dtype=torch.float16, device="meta")
    assert "second grid axis" in backend.extra_reasons(build_problem(many_heads, many_heads, many_heads), caps)[0]
    huge = torch.empty(1, 32, 2**20, 64, dtype=torch.float16, device="meta")  # 2^31 elements
    assert "32-bit" in backend.extra_reasons(build_problem(huge, huge, huge), caps)[0]
