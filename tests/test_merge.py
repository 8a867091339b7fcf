"""`merge_states`: attention over disjoint key sets, merged by LSE, equals attention over their union."""

from __future__ import annotations

import math

import pytest
import torch

from flashdispatch import attention, merge_states

from conftest import assert_close, naive_attention, rand


def split_points(n, parts):
    points = sorted(torch.randperm(n - 1)[: parts - 1].add(1).tolist())
    return [0] + points + [n]


@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merging_key_splits_equals_full_attention(parts, dtype):
    q, k, v = rand(2, 4, 6, 8, dtype=dtype), rand(2, 2, 23, 8, dtype=dtype), rand(2, 2, 23, 5, dtype=dtype)
    bounds = split_points(23, parts)
    outs, lses = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        out, lse = attention(q, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, backend="reference")
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = merge_states(outs, lses)
    expected, expected_lse = naive_attention(q, k, v)
    assert merged.dtype == dtype and merged.shape == (2, 4, 6, 5)
    assert merged_lse.dtype == torch.float32 and merged_lse.shape == (2, 4, 6)
    # The LSEs are float32 (the contract), so the merge weights carry float32 rounding at any dtype.
    assert_close(merged, expected, 2e-6, 1e-6, what="out")
    assert_close(merged_lse, expected_lse, 1e-5, what="lse")


def test_parts_without_keys_weigh_nothing():
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    full, full_lse = attention(q, k, v, return_lse=True, backend="reference")
    empty_out, empty_lse = attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert torch.all(empty_lse == -math.inf)
    # A part with no keys, even with garbage (but finite) in its output, changes nothing.
    garbage = rand(*full.shape) * 1e3
    merged, merged_lse = merge_states([garbage, full, empty_out], [empty_lse, full_lse, empty_lse])
    assert_close(merged, full, 1e-6)
    assert_close(merged_lse, full_lse, 1e-6)


def test_rows_masked_in_one_part_only():
    # A sliding window split at key 5: some rows see no key of a part (their LSE is -inf there).
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 10, 8), rand(1, 2, 10, 8)
    window = (2, 0)  # query i sees keys [i + 4 - 2, i + 4]
    first = _partial(q, k, v, range(0, 5), window)
    second = _partial(q, k, v, range(5, 10), window)
    assert torch.isinf(first[1]).any() and torch.isinf(second[1]).any()
    merged, merged_lse = merge_states([first[0], second[0]], [first[1].float(), second[1].float()])
    expected, expected_lse = naive_attention(q, k, v, window=window)
    assert_close(merged, expected, 2e-6)
    assert_close(merged_lse, expected_lse, 1e-5)


def _partial(q, k, v, keys, window):
    """Attention of q over the listed key positions only, with the full problem's window mask."""
    keys = list(keys)
    nq, nk = q.shape[2], k.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    for i in range(nq):
        centre = i + nk - nq
        cols = [j for j in keys if centre - window[0] <= j <= centre + window[1]]
        if not cols:
            continue
        s = q[:, :, i : i + 1] @ k[:, :, cols].transpose(-1, -2) * scale
        lse[:, :, i] = torch.logsumexp(s, -1)[..., 0]
        out[:, :, i] = (torch.softmax(s, -1) @ v[:, :, cols])[:, :, 0]
    return out, lse


def test_all_empty_rows_give_zero_and_minus_inf():
    outs = [rand(2, 3, 4) for _ in range(3)]
    lses = [torch.full((2, 3), -math.inf) for _ in range(3)]
    merged, merged_lse = merge_states(outs, lses)
    assert merged.shape == (2, 3, 4)
    assert torch.all(merged == 0)
    assert torch.all(merged_lse == -math.inf)


def test_mixed_rows_some_empty_everywhere():
    outs = [rand(1, 3, 2), rand(1, 3, 2)]
    lses = [torch.tensor([[0.5, -math.inf, 1.0]]), torch.tensor([[-math.inf, -math.inf, 2.0]])]
    merged, merged_lse = merge_states(outs, lses)
    assert_close(merged[0, 0], outs[0][0, 0], 1e-7)
    assert torch.all(merged[0, 1] == 0) and merged_lse[0, 1] == -math.inf
    w0, w1 = math.exp(1.0), math.exp(2.0)
    assert_close(merged[0, 2], (w0 * outs[0][0, 2] + w1 * outs[1][0, 2]) / (w0 + w1), 1e-6)
    assert math.isclose(merged_lse[0, 2].item(), math.log(w0 + w1), rel_tol=1e-6)
    assert not torch.isnan(merged).any()


def test_large_lse_does_not_overflow():
    outs = [rand(1, 2, 3), rand(1, 2, 3)]
    lses = [torch.full((1, 2), 1000.0), torch.full((1, 2), 1000.0)]
    merged, merged_lse = merge_states(outs, lses)
    # float32 LSEs near 1000 have a spacing of 6e-5: that bounds the weights' accuracy.
    assert_close(merged, (outs[0] + outs[1]) / 2, 1e-4)
    assert_close(merged_lse, torch.full((1, 2), 1000.0 + math.log(2)), 1e-3)


@pytest.mark.parametrize("outs, lses", [([], []), ([torch.zeros(1, 2)], [])])
def test_bad_arguments(outs, lses):
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        merge_states(outs, lses)
