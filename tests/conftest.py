"""Shared fixtures and helpers for flashdispatch's own tests.

- `gpu`-marked tests are skipped where torch sees no CUDA GPU; there, TRITON_INTERPRET=1 is set so
  that the Triton backend's kernels run in Triton's CPU interpreter.
- Every test starts from the same global state: no FLASHDISPATCH_* variables, the shipped policy,
  an empty decision cache, deterministic algorithms off, and the built-in backends only; whatever a
  test registers is unregistered afterwards.
- `naive_attention` is an independent float64 oracle written from the contract's formulas (it
  shares no code with flashdispatch), used to check `attention_math`, which the other tests then
  use as their reference.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # The Triton backend's kernels run in Triton's CPU interpreter where there is no GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flashdispatch  # noqa: E402
from flashdispatch.dispatcher import policy as policy_module  # noqa: E402

ENV_VARS = ("FLASHDISPATCH_BACKEND", "FLASHDISPATCH_CONFIG", "FLASHDISPATCH_DISABLE_PLUGINS", "FLASHDISPATCH_TRITON_AUTOTUNE",
            "FLASHDISPATCH_TRITON_CONFIG")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _load_registry_once():
    # Load the global registry before any test puts a temporary distribution on sys.path, so that
    # the entry-point tests never leak plugins into it.
    flashdispatch.backends()
    yield


@pytest.fixture(autouse=True)
def clean_state(monkeypatch, tmp_path):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLASHDISPATCH_CACHE_DIR", str(tmp_path / "flashdispatch-cache"))  # never the user's
    flashdispatch.configure(None)
    flashdispatch.clear_decisions()
    plugins_before = {p.name for p in flashdispatch.plugins()}
    backends_before = set(flashdispatch.backends())
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(20240601)
    yield
    torch.use_deterministic_algorithms(deterministic)
    for record in flashdispatch.plugins():
        if record.name not in plugins_before:
            try:
                flashdispatch.unregister(record.name)
            except ValueError:
                pass
    _remove_leaked_backends(backends_before)
    # Reset the policy with the variables still cleared (monkeypatch restores them after us).
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    policy_module.set_policy(None)
    flashdispatch.clear_decisions()


def _remove_leaked_backends(backends_before):
    """Last resort, through private state: a test that exposed a registry bug may have left a
    backend that `unregister` cannot reach; remove it so that later tests see the usual registry."""
    from flashdispatch.dispatcher.registry import REGISTRY

    for name in set(flashdispatch.backends()) - backends_before:
        try:
            flashdispatch.unregister(name)
            continue
        except ValueError:
            pass
        REGISTRY._backends.pop(name, None)
        manager = REGISTRY._manager
        for plugin_name in (f"backend:{name}",):
            plugin = manager.get_plugin(plugin_name) if manager is not None else None
            if plugin is not None:
                manager.unregister(plugin)
    flashdispatch.clear_decisions()


# Data and oracles


def rand(*shape, dtype=torch.float64, requires_grad=False):
    """Fresh random normal data (never zeros; seeded per test by `clean_state`)."""
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def naive_attention(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0):
    """(B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) -> out, lse in float64, written from the
    contract alone: query i sees key j iff
        j <= i + Nk - Nq (causal),  i + Nk - Nq - left <= j <= i + Nk - Nq + right (window).
    Rows that see no key give 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    allowed = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            centre = i + seqlen_k - seqlen_q
            ok = True
            if right >= 0 and j > centre + right:
                ok = False
            if left >= 0 and j < centre - left:
                ok = False
            allowed[i, j] = ok
    out = torch.zeros(batch, heads_q, seqlen_q, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), -math.inf, dtype=torch.float64)
    for h in range(heads_q):
        kh, vh = k[:, h // group], v[:, h // group]
        s = q[:, h] @ kh.transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        for i in range(seqlen_q):
            cols = allowed[i].nonzero().flatten()
            if len(cols) == 0:
                continue
            row = s[:, i, cols]
            m = row.max(-1, keepdim=True).values
            e = torch.exp(row - m)
            out[:, h, i] = torch.einsum("bj,bjd->bd", e / e.sum(-1, keepdim=True), vh[:, cols])
            lse[:, h, i] = (m + torch.log(e.sum(-1, keepdim=True))).squeeze(-1)
    return out, lse


def reference(q, k, v, *, scale=None, causal=False, window=None, softcap=None):
    """flashdispatch's float64 oracle (`attention_math`) with the public argument conventions, in bhsd.

    Differentiable: gradients by autograd through float64 math."""
    from flashdispatch.backends.reference import attention_math

    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attention_math(q, k, v, scale=scale, window_left=left, window_right=right, softcap=softcap or 0.0)


def reference_grads(q, k, v, dout, **options):
    """(out, lse, dq, dk, dv) of the float64 oracle, for inputs of any dtype."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference(*leaves, **options)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return (out.detach(), lse.detach(), *grads)


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    """Compare in float64, NaN never equal, with a message giving the max error."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual == expected)
    diff = torch.where(both_inf, torch.zeros_like(actual), (actual - expected).abs())
    bound = atol + rtol * expected.abs().nan_to_num(posinf=0.0, neginf=0.0)
    worst = (diff - bound).max().item() if diff.numel() else -1.0
    assert worst <= 0, f"{what}: max abs error {diff.max().item():.3e} exceeds atol={atol:g}, rtol={rtol:g}"
