"""Bad input raises ValueError naming the argument, what it got and what was expected; empty
problems are legal and give empty or zero results, LSE -inf where there are no keys, zero gradients."""

from __future__ import annotations

import math

import pytest
import torch

import flashdispatch
from flashdispatch import attention

from conftest import rand


def qkv(b=2, hq=4, hkv=2, nq=5, nk=6, d=8, dv=None, dtype=torch.float32):
    return rand(b, hq, nq, d, dtype=dtype), rand(b, hkv, nk, d, dtype=dtype), rand(b, hkv, nk, dv or d, dtype=dtype)


def packed(lens_q, lens_k, hq=2, hkv=1, d=8, dtype=torch.float32, requires_grad=False):
    q = rand(sum(lens_q), hq, d, dtype=dtype, requires_grad=requires_grad)
    k = rand(sum(lens_k), hkv, d, dtype=dtype, requires_grad=requires_grad)
    v = rand(sum(lens_k), hkv, d, dtype=dtype, requires_grad=requires_grad)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


def raises(fragments, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"
    return message


# Tensors


def test_wrong_rank_names_argument_shape_and_expectation():
    q, k, v = qkv()
    raises(["q", "4 dimensions", "(2, 4, 5)", "(batch, heads, seqlen, head_dim)"], attention, q[..., 0], k, v)
    raises(["k", "4 dimensions", "(2, 2, 6)"], attention, q, k[..., 0], v)
    raises(["v", "4 dimensions", "(1, 2, 2, 6, 8)"], attention, q, k, v[None])


def test_wrong_rank_in_bshd_layout_says_bshd_shape():
    q, k, v = qkv()
    raises(["q", "(batch, seqlen, heads, head_dim)", "bshd"], attention, q[0], k, v, layout="bshd")


def test_mismatched_batch():
    q, k, v = qkv()
    raises(["batch size", "(2, 4, 5, 8)", "(1, 2, 6, 8)"], attention, q, k[:1], v)
    raises(["batch size"], attention, q, k, v[:1])


def test_mismatched_kv_seqlen():
    q, k, v = qkv()
    raises(["sequence length", "(2, 2, 6, 8)", "(2, 2, 5, 8)"], attention, q, k, v[:, :, :5])


def test_mismatched_head_dim():
    q, k, v = qkv()
    raises(["head_dim", "q", "k", "(2, 4, 5, 8)", "(2, 2, 6, 4)"], attention, q, k[..., :4], v)


def test_mismatched_kv_heads():
    q, k, v = qkv()
    raises(["heads", "(2, 2, 6, 8)", "(2, 1, 6, 8)"], attention, q, k, v[:, :1])


def test_query_heads_not_a_multiple_of_kv_heads():
    q, k, v = qkv(hq=3, hkv=2)
    raises(["query heads (3)", "multiple", "key/value heads (2)"], attention, q, k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    raises(["dtype", "float32", "float16"], attention, q, k.half(), v)
    raises(["dtype", "float64"], attention, q, k, v.double())


def test_mixed_devices_with_meta_tensor():
    q, k, v = qkv()
    raises(["device", "cpu", "meta"], attention, q, k.to("meta"), v)


def test_integer_tensors():
    q, k, v = qkv()
    raises(["q", "floating-point", "int64"], attention, q.long(), k, v)
    raises(["k", "floating-point", "int32"], attention, q, k.int(), v)
    raises(["v", "floating-point", "bool"], attention, q, k, v > 0)


@pytest.mark.parametrize("bad", [[[1.0]], None, 3.0, "q"])
def test_non_tensor_inputs(bad):
    q, k, v = qkv()
    raises(["q", "torch.Tensor", type(bad).__name__], attention, bad, k, v)
    raises(["v", "torch.Tensor", type(bad).__name__], attention, q, k, bad)


# Variable-length offsets


def test_cu_seqlens_not_int32():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["cu_seqlens_q", "int32", "int64"], attention, q, k, v, cu_seqlens_q=cq.long(), cu_seqlens_k=ck)
    raises(["cu_seqlens_k", "int32", "float32"], attention, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck.float())


def test_cu_seqlens_not_a_tensor():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["cu_seqlens_q", "int32", "list"], attention, q, k, v, cu_seqlens_q=[0, 3, 7], cu_seqlens_k=ck)


def test_cu_seqlens_not_increasing():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    bad = torch.tensor([0, 5, 3, 7], dtype=torch.int32)
    raises(["cu_seqlens_q", "non-decreasing", "[0, 5, 3, 7]"], attention, q, k, v, cu_seqlens_q=bad,
           cu_seqlens_k=torch.tensor([0, 2, 3, 7], dtype=torch.int32))


def test_cu_seqlens_not_starting_at_zero():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["cu_seqlens_k", "start at 0", "1"], attention, q, k, v, cu_seqlens_q=cq,
           cu_seqlens_k=torch.tensor([1, 2, 7], dtype=torch.int32))


def test_cu_seqlens_not_matching_total_length():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["cu_seqlens_q", "packed length 7", "6"], attention, q, k, v,
           cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), cu_seqlens_k=ck)
    raises(["cu_seqlens_k", "packed length 7", "8"], attention, q, k, v, cu_seqlens_q=cq,
           cu_seqlens_k=torch.tensor([0, 2, 8], dtype=torch.int32))


def test_cu_seqlens_different_batch_sizes():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["same number of sequences", "2", "3"], attention, q, k, v, cu_seqlens_q=cq,
           cu_seqlens_k=torch.tensor([0, 2, 3, 7], dtype=torch.int32))


@pytest.mark.parametrize("which", ["q", "k"])
def test_only_one_cu_seqlens(which):
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    kwargs = {f"cu_seqlens_{which}": cq if which == "q" else ck}
    raises(["cu_seqlens_q", "cu_seqlens_k", "together"], attention, q, k, v, **kwargs)


def test_varlen_wrong_rank():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["q", "3 dimensions", "total_tokens"], attention, q[None], k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)


@pytest.mark.parametrize("side", ["q", "k"])
def test_max_seqlen_without_cu_seqlens(side):
    q, k, v = qkv()
    raises([f"max_seqlen_{side}", f"cu_seqlens_{side}"], attention, q, k, v, **{f"max_seqlen_{side}": 6})


def test_max_seqlen_too_small_for_varlen():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["max_seqlen_k", "5", "3"], attention, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_k=3)


# Options


@pytest.mark.parametrize("window, fragments", [
    ((-2, 0), ["window", "left", ">= -1", "-2"]),
    ((0, -5), ["window", "right", ">= -1", "-5"]),
    ((1.5, 2), ["window", "left", "int", "1.5"]),
    ((True, 2), ["window", "left", "int", "True"]),
    ((1, 2, 3), ["window", "pair", "(1, 2, 3)"]),
    (4, ["window", "pair", "4"]),
    ("ab", ["window", "left", "'a'"]),
])
def test_bad_window(window, fragments):
    q, k, v = qkv()
    raises(fragments, attention, q, k, v, window=window)


@pytest.mark.parametrize("softcap", [-1.0, -0.5, math.inf, math.nan, "3", True])
def test_bad_softcap(softcap):
    q, k, v = qkv()
    raises(["softcap", repr(softcap)], attention, q, k, v, softcap=softcap)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, "0.5", [1.0]])
def test_bad_scale(scale):
    q, k, v = qkv()
    raises(["scale", "finite"], attention, q, k, v, scale=scale)


def test_causal_must_be_bool():
    q, k, v = qkv()
    raises(["causal", "bool", "'yes'"], attention, q, k, v, causal="yes")


@pytest.mark.parametrize("layout", ["bsHd", "thd", None])
def test_unknown_layout(layout):
    q, k, v = qkv()
    raises(["layout", "bhsd", "bshd", repr(layout)], attention, q, k, v, layout=layout)


def test_unknown_layout_in_varlen():
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["layout", "'nope'"], attention, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, layout="nope")


# Backend names


def test_unknown_backend_name():
    q, k, v = qkv()
    message = raises(["backend", "'no-such-kernel'", "reference", "tiled"], attention, q, k, v,
                     backend="no-such-kernel")
    assert "sdpa-math" in message


def test_unknown_backward_backend_name():
    q, k, v = qkv()
    q.requires_grad_()
    raises(["backend", "'nope'"], attention, q, k, v, backend=("reference", "nope"))


def test_unknown_backend_name_from_environment(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "no-such-kernel")
    # The message must say where the bad name came from: the user passed no backend= argument.
    raises(["FLASHDISPATCH_BACKEND", "'no-such-kernel'", "reference"], attention, q, k, v)


def test_environment_backend_after_cached_decision(monkeypatch):
    q, k, v = qkv()
    attention(q, k, v)
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "no-such-kernel")
    with pytest.raises(ValueError, match="no-such-kernel"):
        attention(q, k, v)


@pytest.mark.parametrize("backend", [3, ("reference",), ("reference", "tiled", "sdpa-math"), ("reference", 7),
                                     ["reference"], {"forward": "reference"}])
def test_malformed_backend_argument(backend):
    q, k, v = qkv()
    raises(["backend", "(forward, backward) pair", repr(backend)], attention, q, k, v, backend=backend)


@pytest.mark.parametrize("backend", [3, ["reference"]])
def test_malformed_backend_argument_varlen(backend):
    q, k, v, cq, ck = packed([3, 4], [2, 5])
    raises(["backend", repr(backend)], attention, q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, backend=backend)


def test_explain_validates_too():
    q, k, v = qkv()
    raises(["q", "4 dimensions"], flashdispatch.explain, q[0], k, v)
    raises(["backend", "'nope'"], flashdispatch.explain, q, k, v, backend="nope")


# Validation must not depend on what the decision cache holds.


@pytest.mark.parametrize("good, bad, fragments", [
    ({}, {"max_seqlen_q": 5}, ["max_seqlen_q", "cu_seqlens_q"]),
    ({"causal": True}, {"causal": 1}, ["causal", "bool"]),
    ({"softcap": 1.0}, {"softcap": True}, ["softcap"]),
    ({"scale": 1.0}, {"scale": True}, ["scale"]),
])
def test_validation_after_a_cached_call(good, bad, fragments):
    q, k, v = qkv()
    raises(fragments, attention, q, k, v, **bad)  # rejected on a cold cache
    attention(q, k, v, **good)  # caches a decision for an equal-hashing key
    raises(fragments, attention, q, k, v, **bad)  # and still rejected


# Empty problems


@pytest.mark.parametrize("shape_q, shape_k", [
    ((2, 4, 0, 8), (2, 2, 6, 8)),  # no queries
    ((2, 4, 5, 8), (2, 2, 0, 8)),  # no keys
    ((0, 4, 5, 8), (0, 2, 6, 8)),  # empty batch
    ((2, 4, 0, 8), (2, 2, 0, 8)),  # neither
])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_dense(shape_q, shape_k, causal):
    q = rand(*shape_q, requires_grad=True)
    k = rand(*shape_k, requires_grad=True)
    v = rand(*shape_k[:-1], 3, requires_grad=True)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == shape_q[:-1] + (3,)
    assert out.dtype == q.dtype
    assert lse.shape == shape_q[:-1] and lse.dtype == torch.float32
    assert torch.all(out == 0)
    assert torch.all(lse == -math.inf)
    (out * rand(*out.shape)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.all(t.grad == 0)


def test_empty_dense_bshd_no_keys():
    q = rand(2, 5, 4, 8)
    k = rand(2, 0, 2, 8)
    v = rand(2, 0, 2, 8)
    out, lse = attention(q, k, v, layout="bshd", return_lse=True)
    assert out.shape == (2, 5, 4, 8) and torch.all(out == 0)
    assert lse.shape == (2, 4, 5) and torch.all(lse == -math.inf)


def test_empty_without_grad_or_lse():
    out = attention(rand(1, 2, 3, 4), rand(1, 2, 0, 4), rand(1, 2, 0, 4))
    assert out.shape == (1, 2, 3, 4) and torch.all(out == 0)


@pytest.mark.parametrize("lens_q, lens_k", [
    ([3, 4, 2], [5, 0, 2]),  # a sequence with queries but no keys
    ([3, 0, 2], [5, 3, 2]),  # a sequence with keys but no queries
    ([3, 0, 4, 2], [5, 3, 0, 2]),  # both
])
@pytest.mark.parametrize("backend", [None, "reference", "tiled"])
def test_varlen_with_zero_length_sequences(lens_q, lens_k, backend):
    from conftest import reference_grads

    q, k, v, cq, ck = packed(lens_q, lens_k, hq=2, hkv=1, dtype=torch.float64, requires_grad=True)
    out, lse = attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend=backend)
    total_q = sum(lens_q)
    assert out.shape == (total_q, 2, 8) and lse.shape == (2, total_q) and lse.dtype == torch.float32
    dout = rand(*out.shape)
    out.backward(dout)
    oq, ok_ = cq.tolist(), ck.tolist()
    for i in range(len(lens_q)):
        sq, sk = slice(oq[i], oq[i + 1]), slice(ok_[i], ok_[i + 1])
        if lens_q[i] == 0:
            # A sequence with no queries: its keys get no gradient.
            assert torch.all(k.grad[sk] == 0) and torch.all(v.grad[sk] == 0)
            continue
        if lens_k[i] == 0:
            assert torch.all(out[sq] == 0)
            assert torch.all(lse[:, sq] == -math.inf)
            assert torch.all(q.grad[sq] == 0)
            continue
        as_dense = lambda t: t.transpose(0, 1)[None]  # noqa: E731  (N, H, D) -> (1, H, N, D)
        ro, rl, dq, dk, dv = reference_grads(as_dense(q[sq]), as_dense(k[sk]), as_dense(v[sk]), as_dense(dout[sq]))
        assert torch.allclose(as_dense(out[sq]).double(), ro, atol=1e-5)
        assert torch.allclose(lse[:, sq].double(), rl[0], atol=1e-5)
        assert torch.allclose(as_dense(q.grad[sq]), dq, atol=1e-5)
        assert torch.allclose(as_dense(k.grad[sk]), dk, atol=1e-5)
        assert torch.allclose(as_dense(v.grad[sk]), dv, atol=1e-5)
    for t in (out, lse, q.grad, k.grad, v.grad):
        assert not torch.isnan(t).any()


def test_varlen_all_keys_empty():
    q, k, v, cq, ck = packed([2, 3], [0, 0], requires_grad=True)
    out, lse = attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True)
    assert out.shape == (5, 2, 8) and torch.all(out == 0)
    assert lse.shape == (2, 5) and torch.all(lse == -math.inf)
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_zero_heads_is_empty():
    out = attention(rand(1, 0, 3, 4), rand(1, 0, 3, 4), rand(1, 0, 3, 4))
    assert out.shape == (1, 0, 3, 4)
