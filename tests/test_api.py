"""`attention()` semantics against float64 math, autograd, cross-backend backward, decision caching,
deterministic mode, logging, `explain()` and the errors when no backend can run a problem."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import flashdispatch
from flashdispatch import Backend, NoBackendError, Support, attention
from flashdispatch.backends.reference import ReferenceBackend

from conftest import assert_close, naive_attention, rand, reference, reference_grads

CPU_BACKENDS = ["reference", "tiled", "sdpa-math"]
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (name, options, Nq, Nk): every feature, every causal alignment case.
CASES = [
    ("plain", {}, 7, 9),
    ("causal-square", {"causal": True}, 8, 8),
    ("causal-nq<nk", {"causal": True}, 5, 11),
    ("causal-nq>nk", {"causal": True}, 11, 5),  # the first rows see no key
    ("window", {"window": (2, 1)}, 9, 9),
    ("window-left-only", {"window": (3, -1)}, 6, 10),
    ("window-right-only", {"window": (-1, 2)}, 10, 6),
    ("window-causal", {"window": (2, 5), "causal": True}, 7, 12),
    ("softcap", {"softcap": 2.0}, 6, 7),
    ("scale", {"scale": 0.9}, 6, 7),
]


def supports(backend, options):
    return not (backend == "sdpa-math" and options.get("softcap"))


def to_bshd(t):
    return t.transpose(1, 2).contiguous()


# The oracle itself, checked against an independent loop-by-loop implementation of the contract.


@pytest.mark.parametrize("name, options, nq, nk", CASES, ids=[c[0] for c in CASES])
def test_attention_math_matches_naive_oracle(name, options, nq, nk):
    q, k, v = rand(2, 4, nq, 8), rand(2, 2, nk, 8), rand(2, 2, nk, 5)
    out, lse = reference(q, k, v, **options)
    window = options.get("window") or (-1, -1)
    expected_out, expected_lse = naive_attention(q, k, v, scale=options.get("scale"), causal=options.get("causal", False),
                                                 window=window, softcap=options.get("softcap") or 0.0)
    assert_close(out, expected_out, 1e-12, what="out")
    assert_close(lse, expected_lse, 1e-12, what="lse")


# Forward semantics, every CPU backend


@pytest.mark.parametrize("name, options, nq, nk", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_forward_matches_reference(backend, name, options, nq, nk):
    if not supports(backend, options):
        pytest.skip(f"{backend} does not support {options}")
    q, k, v = rand(2, 4, nq, 16, dtype=torch.float32), rand(2, 2, nk, 16, dtype=torch.float32), rand(2, 2, nk, 8, dtype=torch.float32)
    out, lse = attention(q, k, v, return_lse=True, backend=backend, **options)
    expected_out, expected_lse = reference(q, k, v, **options)
    assert out.shape == (2, 4, nq, 8) and out.dtype == torch.float32
    assert lse.shape == (2, 4, nq) and lse.dtype == torch.float32
    assert_close(out, expected_out, 2e-5, 1e-5, what="out")
    assert_close(lse, expected_lse, 2e-5, 1e-5, what="lse")


@pytest.mark.parametrize("name, options, nq, nk", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_bshd_equals_bhsd(backend, name, options, nq, nk):
    if not supports(backend, options):
        pytest.skip(f"{backend} does not support {options}")
    q, k, v = rand(2, 4, nq, 8), rand(2, 2, nk, 8), rand(2, 2, nk, 8)
    out, lse = attention(q, k, v, return_lse=True, backend=backend, **options)
    out_s, lse_s = attention(to_bshd(q), to_bshd(k), to_bshd(v), layout="bshd", return_lse=True, backend=backend, **options)
    assert out_s.shape == (2, nq, 4, 8)
    assert lse_s.shape == (2, 4, nq)
    assert_close(out_s.transpose(1, 2), out, 1e-6, what="out")
    assert_close(lse_s, lse, 1e-6, what="lse")
    # A strided bshd view of a bhsd tensor is accepted too (no copy needed by the caller).
    out_v = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bshd", backend=backend, **options)
    assert_close(out_v.transpose(1, 2), out, 1e-6, what="out (strided views)")


@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
@pytest.mark.parametrize("hq, hkv", [(6, 3), (4, 1), (4, 4)])
def test_gqa_equals_repeated_heads(backend, hq, hkv):
    q, k, v = rand(2, hq, 6, 8), rand(2, hkv, 7, 8), rand(2, hkv, 7, 8)
    out = attention(q, k, v, causal=True, backend=backend)
    group = hq // hkv
    expected, _ = naive_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), causal=True)
    assert_close(out, expected, 1e-5)


@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
def test_float64_inputs_get_float64_accuracy(backend):
    """A backend declaring float64 must compute like float64 math (the exactness rule: within 2x of
    plain float64 math's error, plus a small floor), not like float32 math."""
    q, k, v = rand(2, 4, 40, 16), rand(2, 2, 50, 16), rand(2, 2, 50, 16)
    dout = rand(2, 4, 40, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=True, backend=backend)
    out.backward(dout)
    expected_out, _, dq, dk, dv = reference_grads(q, k, v, dout, causal=True)
    assert_close(out, expected_out, 1e-10, what="out")
    # The contract saves the LSE in float32, and a backward may consume any forward's LSE: that
    # bounds the gradients' accuracy near float32's (the forward has no such excuse).
    for got, want, name in zip((l.grad for l in leaves), (dq, dk, dv), "qkv"):
        assert_close(got, want, 1e-6, 1e-6, what=f"d{name}")


@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_runs(backend, dtype):
    q, k, v = (rand(1, 2, 5, 8, dtype=dtype) for _ in range(3))
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected, expected_lse = reference(q, k, v, causal=True)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)
    assert_close(out, expected, tol, tol, what="out")
    assert_close(lse, expected_lse, tol, tol, what="lse")


# Variable-length batches


def pack(seqs):
    """[(N_i, H, D)] -> (total, H, D), int32 cu_seqlens."""
    lens = [s.shape[0] for s in seqs]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(seqs), cu


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": (2, 1)}, {"softcap": 3.0}],
                         ids=["plain", "causal", "window", "softcap"])
@pytest.mark.parametrize("backend", [None, "reference", "tiled"])
def test_varlen_equals_separate_sequences(backend, options):
    lens_q, lens_k = [3, 7, 1, 5], [6, 4, 1, 9]
    # float32: the packed and the per-sequence calls may run on different backends.
    qs = [rand(n, 4, 8, dtype=torch.float32, requires_grad=True) for n in lens_q]
    ks = [rand(n, 2, 8, dtype=torch.float32, requires_grad=True) for n in lens_k]
    vs = [rand(n, 2, 8, dtype=torch.float32, requires_grad=True) for n in lens_k]
    q, cq = pack([t.detach() for t in qs])
    k, ck = pack([t.detach() for t in ks])
    v, _ = pack([t.detach() for t in vs])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7, max_seqlen_k=9,
                         return_lse=True, backend=backend, **options)
    assert out.shape == (16, 4, 8)
    assert lse.shape == (4, 16) and lse.dtype == torch.float32
    dout = rand(*out.shape)
    out.backward(dout)
    offsets = cq.tolist()
    for i, (qi, ki, vi) in enumerate(zip(qs, ks, vs)):
        rows = slice(offsets[i], offsets[i + 1])
        o, l_ = attention(qi[None], ki[None], vi[None], layout="bshd", return_lse=True, backend=backend, **options)
        o.backward(dout[rows][None])
        assert_close(out[rows], o[0], 1e-5, 1e-5, what=f"out of sequence {i}")
        assert_close(lse[:, rows], l_[0], 1e-5, 1e-5, what=f"lse of sequence {i}")
    for packed_t, parts, name in ((q, qs, "q"), (k, ks, "k"), (v, vs, "v")):
        assert_close(packed_t.grad, torch.cat([p.grad for p in parts]), 2e-5, 1e-5, what=f"d{name}")


def test_varlen_against_reference_float64():
    lens = [4, 9, 2]
    q, cq = pack([rand(n, 2, 8) for n in lens])
    k, ck = pack([rand(n, 1, 8) for n in lens])
    v, _ = pack([rand(n, 1, 8) for n in lens])
    out = attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
    for i in range(len(lens)):
        rows = slice(cq[i].item(), cq[i + 1].item())
        as_dense = lambda t: t[rows].transpose(0, 1)[None]  # noqa: E731
        expected, _ = naive_attention(as_dense(q), as_dense(k), as_dense(v), causal=True)
        assert_close(out[rows].transpose(0, 1)[None], expected, 1e-5)


# Autograd


@pytest.mark.parametrize("name, options, nq, nk", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", [None] + CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gradients_match_reference(backend, name, options, nq, nk, layout):
    if not supports(backend, options):
        pytest.skip(f"{backend} does not support {options}")
    q, k, v = rand(2, 4, nq, 8, dtype=torch.float32), rand(2, 2, nk, 8, dtype=torch.float32), rand(2, 2, nk, 8, dtype=torch.float32)
    dout = rand(2, 4, nq, 8, dtype=torch.float32)
    expected = reference_grads(q, k, v, dout, **options)
    convert = to_bshd if layout == "bshd" else (lambda t: t.clone())
    leaves = [convert(t).requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, layout=layout, backend=backend, **options)
    out.backward(convert(dout))
    back = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    assert_close(back(out), expected[0], 2e-5, 1e-5, what="out")
    for leaf, want, which in zip(leaves, expected[2:], "qkv"):
        assert_close(back(leaf.grad), want, 5e-5, 1e-4, what=f"d{which}")


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa-math"])
def test_gradcheck(backend):
    """torch.autograd.gradcheck on a tiny float64 problem: finite differences of the forward against
    the backend's own backward, at gradcheck's default tolerances."""
    q = rand(1, 2, 3, 4, requires_grad=True)
    k = rand(1, 1, 5, 4, requires_grad=True)
    v = rand(1, 1, 5, 3, requires_grad=True)
    options = {"causal": True} if backend == "sdpa-math" else {"causal": True, "softcap": 1.5}
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, backend=backend, **options), (q, k, v))


@pytest.mark.parametrize("pair, options", [
    (("reference", "tiled"), {"causal": True, "softcap": 2.0}),
    (("tiled", "sdpa-math"), {"window": (3, 1)}),
    (("sdpa-math", "reference"), {"causal": True}),
    (("sdpa-math", "tiled"), {}),
    (("tiled", "reference"), {"window": (-1, 2), "softcap": 1.0}),
], ids=lambda x: "-".join(x) if isinstance(x, tuple) else None)
def test_cross_backend_backward(pair, options, monkeypatch):
    forward_name, backward_name = pair
    registered = flashdispatch.backends()
    calls = {"forward": [], "backward": []}
    for direction, name in (("forward", forward_name), ("backward", backward_name)):
        backend = registered[name]
        original = getattr(backend, direction)

        def spy(*args, _original=original, _name=name, _direction=direction, **kwargs):
            calls[_direction].append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, direction, spy)
    q, k, v = rand(2, 4, 9, 8), rand(2, 2, 12, 8), rand(2, 2, 12, 8)
    dout = rand(2, 4, 9, 8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, backend=pair, **options)
    out.backward(dout)
    assert calls == {"forward": [forward_name], "backward": [backward_name]}
    expected = reference_grads(q, k, v, dout, **options)
    assert_close(out, expected[0], 1e-5, what="out")
    for leaf, want, which in zip(leaves, expected[2:], "qkv"):
        assert_close(leaf.grad, want, 1e-5, 1e-5, what=f"d{which}")
    explanation = flashdispatch.explain(q, k, v, backend=pair, **options)
    assert (explanation.forward, explanation.backward) == pair


def test_forcing_one_backend_forces_its_backward():
    q, k, v = (rand(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    explanation = flashdispatch.explain(q, k, v, backend="tiled")
    assert (explanation.forward, explanation.backward) == ("tiled", "tiled")


def test_forced_backward_only():
    q, k, v = (rand(1, 2, 4, 8) for _ in range(3))
    explanation = flashdispatch.explain(q, k, v, backend=(None, "reference"))
    assert explanation.backward == "reference"


def test_lse_carries_no_gradient():
    q, k, v = (rand(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, return_lse=True)
    assert out.requires_grad
    assert not lse.requires_grad
    with pytest.raises(RuntimeError):
        torch.autograd.grad(lse.sum(), q)
    (out.sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v).sum().backward()
    for before, t in zip(grads, (q, k, v)):
        assert torch.equal(before, t.grad)


def test_rows_without_keys_have_zero_output_and_gradient():
    q = rand(1, 2, 8, 4, requires_grad=True)
    k, v = rand(1, 2, 3, 4, requires_grad=True), rand(1, 2, 3, 4, requires_grad=True)
    for backend in CPU_BACKENDS:
        q.grad = None
        out, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
        out.sum().backward()
        assert torch.all(out[:, :, :5] == 0), backend
        assert torch.all(lse[:, :, :5] == -math.inf), backend
        assert torch.all(q.grad[:, :, :5] == 0), backend
        assert not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any(), backend


def test_no_grad_mode_does_not_build_a_graph():
    q, k, v = (rand(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        out = attention(q, k, v)
    assert not out.requires_grad


# Decision caching


@pytest.fixture
def decide_calls(monkeypatch):
    calls = []
    original = flashdispatch.api.decide

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(flashdispatch.api, "decide", counting)
    return calls


def test_second_identical_call_is_cached(decide_calls):
    q, k, v = (rand(1, 2, 4, 8, dtype=torch.float32) for _ in range(3))
    first = attention(q, k, v, causal=True)
    assert len(decide_calls) == 1
    second = attention(q, k, v, causal=True)
    assert len(decide_calls) == 1
    assert torch.equal(first, second)
    # New tensors of the same shape hit the cache too.
    attention(*(rand(1, 2, 4, 8, dtype=torch.float32) for _ in range(3)), causal=True)
    assert len(decide_calls) == 1
    # Anything the decision depends on is a new key.
    attention(q, k, v, causal=False)
    attention(q.double(), k.double(), v.double(), causal=True)
    attention(q, k, v, causal=True, return_lse=True)
    attention(q.requires_grad_(), k, v, causal=True)
    assert len(decide_calls) == 5


def test_clear_decisions(decide_calls):
    q, k, v = (rand(1, 2, 4, 8) for _ in range(3))
    attention(q, k, v)
    attention(q, k, v)
    flashdispatch.clear_decisions()
    attention(q, k, v)
    assert len(decide_calls) == 2


def test_configure_and_registration_clear_decisions(decide_calls):
    q, k, v = (rand(1, 2, 4, 8) for _ in range(3))
    attention(q, k, v)
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["tiled", "*"]}}})
    attention(q, k, v)
    assert len(decide_calls) == 2
    assert flashdispatch.explain(q, k, v).forward == "tiled"


def test_varlen_decisions_are_cached(decide_calls):
    q, cq = pack([rand(3, 2, 8), rand(5, 2, 8)])
    k, ck = pack([rand(4, 2, 8), rand(5, 2, 8)])
    attention(q, k, k, cu_seqlens_q=cq, cu_seqlens_k=ck)
    attention(q, k, k, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert len(decide_calls) == 1


# Deterministic mode


class NonDeterministicBackend(Backend):
    """Forward by float64 math (deterministic); declares a non-deterministic backward."""

    name = "test-nondeterministic"
    support = Support(dtypes=ALL_DTYPES, devices=("cpu",), causal=True, window=True, softcap=True, gqa=True,
                      varlen=True, backward=True, deterministic_backward=False)

    def __init__(self):
        self.inner = ReferenceBackend()
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append("forward")
        return self.inner.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls.append("backward")
        return self.inner.backward(*args, **kwargs)


def test_deterministic_mode_skips_nondeterministic_backward():
    fake = NonDeterministicBackend()
    flashdispatch.register_backend(fake)
    flashdispatch.configure({"rankings": {"cpu": {"forward": [fake.name, "*"], "backward": [fake.name, "*"]}}})
    q, k, v = (rand(1, 2, 6, 8, requires_grad=True) for _ in range(3))

    # Not deterministic: the fake runs both directions (so this test can tell the difference).
    explanation = flashdispatch.explain(q, k, v)
    assert (explanation.forward, explanation.backward) == (fake.name, fake.name)
    attention(q, k, v).sum().backward()
    assert fake.calls == ["forward", "backward"]

    fake.calls.clear()
    torch.use_deterministic_algorithms(True)
    explanation = flashdispatch.explain(q, k, v)
    assert explanation.forward == fake.name
    assert explanation.backward != fake.name
    assert flashdispatch.backends()[explanation.backward].support.deterministic_backward
    assert "not deterministic" in str(explanation)
    for t in (q, k, v):
        t.grad = None
    out = attention(q, k, v)
    out.backward(torch.ones_like(out))
    assert fake.calls == ["forward"]
    expected = reference_grads(q, k, v, torch.ones_like(out))
    for t, want in zip((q, k, v), expected[2:]):
        assert_close(t.grad, want, 1e-5)

    # Forcing it for the backward is refused with its reason.
    with pytest.raises(NoBackendError, match="not deterministic"):
        attention(q, k, v, backend=(None, fake.name))


# Logging


def test_new_decision_logs_once_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="flashdispatch")
    q, k, v = (rand(1, 3, 5, 8) for _ in range(3))

    def decision_records():
        return [r for r in caplog.records if r.name == "flashdispatch" and "forward" in r.getMessage()]

    attention(q, k, v, causal=True)
    records = decision_records()
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert "B=1" in records[0].getMessage() and "causal" in records[0].getMessage()
    for _ in range(3):
        attention(q, k, v, causal=True)
    assert len(decision_records()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# explain() and NoBackendError


def test_explain_lists_every_backend_with_reasons():
    q, k, v = (rand(1, 2, 5, 8, dtype=torch.float32) for _ in range(3))
    explanation = flashdispatch.explain(q, k, v, softcap=3.0)
    text = str(explanation)
    for name in flashdispatch.backends():
        assert name in text
        assert name in explanation.reasons
    assert explanation.forward in ("reference", "tiled")  # sdpa-math has no softcap
    assert "no softcap" in text
    assert "runs on cuda, not cpu" in text  # the GPU-only backends say why
    assert explanation.reasons["sdpa-math"]["forward"] == ["no softcap"]
    assert explanation.reasons["tiled"] == {"forward": [], "backward": []}
    assert explanation.caps.arch == "cpu"


def test_explain_does_not_run_attention(monkeypatch):
    registered = flashdispatch.backends()
    for backend in registered.values():
        monkeypatch.setattr(backend, "forward", lambda *a, **k: pytest.fail("explain ran a forward"))
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    assert flashdispatch.explain(q, k, v).forward is not None


def test_forcing_unsupported_backend_raises_with_its_reasons():
    q, k, v = (rand(1, 2, 5, 8, dtype=torch.float32) for _ in range(3))
    with pytest.raises(NoBackendError) as info:
        attention(q, k, v, backend="sdpa-flash")
    message = str(info.value)
    assert "sdpa-flash" in message and "backend= argument" in message
    assert "runs on cuda, not cpu" in message
    assert "dtype float32 not supported" in message
    assert info.value.reasons["sdpa-flash"]
    with pytest.raises(NoBackendError, match="no softcap"):
        attention(q, k, v, softcap=1.0, backend="sdpa-math")


def test_forcing_unsupported_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "sdpa-cudnn")
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(NoBackendError, match="FLASHDISPATCH_BACKEND") as info:
        attention(q, k, v)
    assert "runs on cuda, not cpu" in str(info.value)


def test_environment_forces_backend_pair(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "reference,tiled")
    q, k, v = (rand(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    explanation = flashdispatch.explain(q, k, v)
    assert (explanation.forward, explanation.backward) == ("reference", "tiled")
    assert "FLASHDISPATCH_BACKEND" in explanation.decision.forward.how


def test_no_backend_error_lists_every_backend():
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["sdpa-flash"], "backward": ["sdpa-flash"]}}})
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(NoBackendError) as info:
        attention(q, k, v)
    message = str(info.value)
    assert "no backend can run the forward" in message
    for name in flashdispatch.backends():
        assert f"  {name}: " in message, f"{name} missing from:\n{message}"
    assert set(info.value.reasons) == set(flashdispatch.backends())
    assert "runs on cuda, not cpu" in message
    assert "not ranked by the active policy" in message
    explanation = flashdispatch.explain(q, k, v)
    assert explanation.forward is None
    assert "no backend can run" in str(explanation)


def test_no_backend_error_when_every_ranked_backend_refuses():
    class Refusing(Backend):
        name = "test-refusing"
        support = Support(dtypes=ALL_DTYPES)

        def extra_reasons(self, problem, caps):
            return ["refuses everything, on purpose"]

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
            raise AssertionError("a refusing backend must never run")

    flashdispatch.register_backend(Refusing())
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["test-refusing", "sdpa-math"]}}})
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(NoBackendError) as info:
        attention(q, k, v, softcap=1.0)  # sdpa-math refuses softcap
    message = str(info.value)
    assert "test-refusing: " in message and "refuses everything, on purpose" in message
    assert "sdpa-math: no softcap" in message
    for name in flashdispatch.backends():
        assert name in message


def test_backend_without_forward_is_refused_at_registration():
    class NoForward(Backend):
        name = "test-no-forward"
        support = Support(dtypes=ALL_DTYPES)

    with pytest.raises(ValueError, match="does not implement forward"):
        flashdispatch.register_backend(NoForward())
    assert "test-no-forward" not in flashdispatch.backends()


def test_decoding_uses_the_decode_ranking():
    # A forward with at most 16 queries per sequence is ranked by "decode" when a policy has one.
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["sdpa-math"], "decode": ["tiled"]}}})
    k, v = rand(1, 2, 64, 8), rand(1, 2, 64, 8)
    assert flashdispatch.explain(rand(1, 2, 16, 8), k, v).forward == "tiled"
    assert flashdispatch.explain(rand(1, 2, 17, 8), k, v).forward == "sdpa-math"


def test_unregistering_a_backend_keeps_its_plugins_other_backends():
    from flashdispatch.dispatcher.registry import Registry

    registry = Registry()  # a private one: the global registry stays as it is
    registry.unregister("sdpa-math")
    assert "sdpa-math" not in registry.backends()
    assert {"tiled", "reference"} <= set(registry.backends())
    registry.unregister("builtin")
    assert not registry.backends()


def test_forcing_a_refusing_backend_raises_even_for_an_empty_problem():
    q = rand(1, 2, 0, 8)
    with pytest.raises(NoBackendError, match="sdpa-flash"):
        attention(q, rand(1, 2, 4, 8), rand(1, 2, 4, 8), backend="sdpa-flash")  # runs on cuda only


def test_environment_can_force_only_the_backward(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", ",tiled")
    q, k, v = (rand(1, 2, 5, 8).requires_grad_() for _ in range(3))
    explanation = flashdispatch.explain(q, k, v)
    assert explanation.backward == "tiled" and "FLASHDISPATCH_BACKEND" in explanation.decision.backward.how


def test_decision_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(flashdispatch.api, "MAX_DECISIONS", 8)
    k, v = rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    for n in range(1, 30):
        attention(rand(1, 2, n, 8), k, v)
        assert len(flashdispatch.api._decisions) <= 8
