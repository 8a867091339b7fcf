"""Plugins: run-time registration, malformed and raising plugins, entry-point discovery and
FLASHDISPATCH_DISABLE_PLUGINS. The global registry is restored by `clean_state` in conftest."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

import flashdispatch
from flashdispatch import Backend, NoBackendError, Support, attention
from flashdispatch.dispatcher import registry as registry_module
from flashdispatch.dispatcher.registry import Registry

from conftest import assert_close, rand, reference

BUILTIN = ["reference", "tiled", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DoubleMath(Backend):
    """A tiny, correct backend: float64 math on the score matrix, no masks, no backward."""

    name = "test-double-math"
    support = Support(dtypes=DTYPES, devices=("cpu",), causal=False)
    description = "a test backend"

    def __init__(self, name=None):
        if name is not None:
            self.name = name
        self.calls = 0

    def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
        self.calls += 1
        s = (q.double() @ k.double().transpose(-1, -2)) * problem.scale
        lse = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ v.double()
        return out.to(q.dtype), lse.float()


def assert_registry_works():
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert_close(out, reference(q, k, v, causal=True)[0], 1e-5)
    for name in BUILTIN:
        assert name in flashdispatch.backends()


# Run-time registration


def test_register_backend_lists_forces_and_unregisters():
    backend = DoubleMath()
    flashdispatch.register_backend(backend)
    assert flashdispatch.backends()[backend.name] is backend
    assert any(backend.name in p.backends and p.error is None for p in flashdispatch.plugins())
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    out = attention(q, k, v, backend=backend.name)
    assert backend.calls == 1
    assert_close(out, reference(q, k, v)[0], 1e-12)
    assert backend.name in str(flashdispatch.explain(q, k, v))
    # Not chosen for what it does not support: the error carries its reason.
    with pytest.raises(NoBackendError, match="no causal masking"):
        attention(q, k, v, causal=True, backend=backend.name)

    flashdispatch.unregister(backend.name)
    assert backend.name not in flashdispatch.backends()
    assert not any(backend.name in p.backends for p in flashdispatch.plugins())
    with pytest.raises(ValueError, match=backend.name):
        attention(q, k, v, backend=backend.name)
    assert_registry_works()


def test_third_party_backend_ranked_by_wildcard():
    # The shipped CPU ranking is [sdpa-math, "*", tiled, reference]: a plugin comes after sdpa-math.
    backend = DoubleMath()
    flashdispatch.register_backend(backend)
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    assert flashdispatch.explain(q, k, v).forward == "sdpa-math"
    assert flashdispatch.explain(q, k, v, softcap=1.0).forward != backend.name  # refuses softcap
    flashdispatch.configure({"rankings": {"cpu": {"forward": [backend.name, "*"]}}})
    assert flashdispatch.explain(q, k, v).forward == backend.name


class HookPlugin:
    def __init__(self, backends):
        self._backends = backends

    @flashdispatch.hookimpl
    def flashdispatch_backends(self):
        return self._backends


def test_register_plugin_with_hookimpl_object():
    one, two = DoubleMath("test-plugin-one"), DoubleMath("test-plugin-two")
    plugin = HookPlugin([one, two])
    flashdispatch.register_plugin(plugin, name="test-plugin")
    assert flashdispatch.backends()["test-plugin-one"] is one
    assert flashdispatch.backends()["test-plugin-two"] is two
    record = next(p for p in flashdispatch.plugins() if p.name == "test-plugin")
    assert record.backends == ["test-plugin-one", "test-plugin-two"] and record.error is None
    assert record.source == "run time"
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    attention(q, k, v, backend="test-plugin-two")
    assert (one.calls, two.calls) == (0, 1)
    flashdispatch.unregister("test-plugin")
    assert "test-plugin-one" not in flashdispatch.backends()
    assert "test-plugin-two" not in flashdispatch.backends()
    assert_registry_works()


def test_register_plugin_without_name_and_unregister_by_backend():
    plugin = HookPlugin([DoubleMath("test-anon")])
    flashdispatch.register_plugin(plugin)
    assert "test-anon" in flashdispatch.backends()
    flashdispatch.unregister("test-anon")  # by backend name
    assert "test-anon" not in flashdispatch.backends()
    # The plugin can come back after being removed.
    flashdispatch.register_plugin(HookPlugin([DoubleMath("test-anon")]))
    assert "test-anon" in flashdispatch.backends()


def test_register_plugin_module_style():
    module = type(sys)("test_flashdispatch_module_plugin")

    @flashdispatch.hookimpl
    def flashdispatch_backends():
        return [DoubleMath("test-module-backend")]

    module.flashdispatch_backends = flashdispatch_backends
    flashdispatch.register_plugin(module)
    assert any(p.name == "test_flashdispatch_module_plugin" for p in flashdispatch.plugins())
    assert "test-module-backend" in flashdispatch.backends()


def test_unregister_unknown_name():
    with pytest.raises(ValueError, match="no-such-plugin"):
        flashdispatch.unregister("no-such-plugin")


# Malformed backends and plugins


class Nameless(DoubleMath):
    name = ""


class NotABackend:
    name = "test-not-a-backend"


@pytest.mark.parametrize("bad, fragment", [
    (Nameless(), "no name"),
    (object(), "no name"),
    (NotABackend(), "has no attribute 'support'"),
    (DoubleMath("reference"), "already registered"),
])
def test_malformed_backend_raises_and_registry_keeps_working(bad, fragment):
    plugins_before = [(p.name, list(p.backends), p.error) for p in flashdispatch.plugins()]
    backends_before = flashdispatch.backends()
    with pytest.raises(ValueError, match=fragment):
        flashdispatch.register_backend(bad)
    assert flashdispatch.backends() == backends_before
    assert [(p.name, list(p.backends), p.error) for p in flashdispatch.plugins()] == plugins_before
    assert_registry_works()


def test_duplicate_backend_registration_keeps_the_first():
    first = DoubleMath("test-dup")
    flashdispatch.register_backend(first)
    plugins_before = [(p.name, list(p.backends), p.error) for p in flashdispatch.plugins()]
    with pytest.raises(ValueError, match="already"):
        flashdispatch.register_backend(DoubleMath("test-dup"))
    assert flashdispatch.backends()["test-dup"] is first
    assert [(p.name, list(p.backends), p.error) for p in flashdispatch.plugins()] == plugins_before
    # The first registration is intact: it still runs and can still be removed.
    q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
    attention(q, k, v, backend="test-dup")
    assert first.calls == 1
    flashdispatch.unregister("test-dup")
    assert "test-dup" not in flashdispatch.backends()
    assert_registry_works()


def test_duplicate_backend_in_a_plugin():
    plugin = HookPlugin([DoubleMath("test-ok"), DoubleMath("tiled")])
    with pytest.raises(ValueError, match="'tiled' is already registered"):
        flashdispatch.register_plugin(plugin, name="test-dup-plugin")
    # Nothing of it is registered: not even its valid backend.
    assert "test-ok" not in flashdispatch.backends()
    assert not any(p.name == "test-dup-plugin" for p in flashdispatch.plugins())
    assert flashdispatch.backends()["tiled"].__class__.__name__ == "TiledBackend"
    assert_registry_works()


class RaisingHook:
    @flashdispatch.hookimpl
    def flashdispatch_backends(self):
        raise RuntimeError("plugin exploded while registering")


def test_plugin_whose_hook_raises_is_refused_at_run_time():
    with pytest.raises(ValueError, match="plugin exploded while registering"):
        flashdispatch.register_plugin(RaisingHook(), name="test-raising")
    assert not any(p.name == "test-raising" for p in flashdispatch.plugins())
    assert_registry_works()
    # The same name can be used by a working plugin afterwards.
    flashdispatch.register_plugin(HookPlugin([DoubleMath("test-after-raise")]), name="test-raising")
    assert "test-after-raise" in flashdispatch.backends()


class RaisingReasons(DoubleMath):
    name = "test-raising-reasons"

    def not_supported_reasons(self, problem, caps):
        raise ZeroDivisionError("reasons blew up")


def test_not_supported_reasons_raising_is_a_reason():
    flashdispatch.register_backend(RaisingReasons())
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["test-raising-reasons", "*"],
                                                  "backward": ["test-raising-reasons", "*"]}}})
    q, k, v = (rand(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)  # ranked first, refused through its exception, others run
    out.sum().backward()
    assert_close(out, reference(q, k, v)[0], 1e-5)
    explanation = flashdispatch.explain(q, k, v)
    assert explanation.forward != "test-raising-reasons"
    reasons = explanation.reasons["test-raising-reasons"]["forward"]
    assert reasons and "ZeroDivisionError" in reasons[0] and "reasons blew up" in reasons[0]
    assert "reasons blew up" in str(explanation)
    with pytest.raises(NoBackendError, match="ZeroDivisionError: reasons blew up"):
        attention(q, k, v, backend="test-raising-reasons")


# Entry points (a temporary distribution on sys.path) and a fresh Registry


@pytest.fixture
def distribution(tmp_path, monkeypatch):
    """Writes a distribution with entry points in group 'flashdispatch' onto sys.path.

    Returns (write(name, source) -> entry-point name, suffix); module names are unique per test so
    that sys.modules never holds a stale copy."""
    suffix = uuid.uuid4().hex[:8]
    entries = {}

    def write(entry, source):
        module = f"fdtest_{entry}_{suffix}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        entries[f"{entry}_{suffix}"] = module
        dist = tmp_path / f"fdtest_plugins_{suffix}-0.1.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fdtest-plugins-{suffix}\nVersion: 0.1\n")
        lines = "\n".join(f"{name} = {mod}" for name, mod in entries.items())
        (dist / "entry_points.txt").write_text(f"[flashdispatch]\n{lines}\n")
        return f"{entry}_{suffix}"

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write, suffix
    for module in entries.values():
        sys.modules.pop(module, None)


GOOD_PLUGIN = """
    import torch
    import flashdispatch
    from flashdispatch import Backend, Support


    class Good(Backend):
        name = "fdtest-good-{suffix}"
        support = Support(dtypes=(torch.float32, torch.float64), devices=("cpu",), causal=False)

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
            s = (q.double() @ k.double().transpose(-1, -2)) * problem.scale
            return (torch.softmax(s, -1) @ v.double()).to(q.dtype), torch.logsumexp(s, -1).float()


    @flashdispatch.hookimpl
    def flashdispatch_backends():
        return [Good()]
"""

BROKEN_IMPORT = """
    import flashdispatch
    raise ImportError("fdtest: a dependency of this plugin is missing")
"""

RAISING_HOOK = """
    import flashdispatch


    @flashdispatch.hookimpl
    def flashdispatch_backends():
        raise RuntimeError("fdtest: hook failed")
"""

NAMELESS = """
    import torch
    import flashdispatch


    class Nameless(flashdispatch.Backend):
        support = flashdispatch.Support(dtypes=(torch.float32,))


    @flashdispatch.hookimpl
    def flashdispatch_backends():
        return [Nameless()]
"""


def test_entry_points_good_and_broken(distribution):
    write, suffix = distribution
    good = write("good", GOOD_PLUGIN.replace("{suffix}", suffix))
    broken = write("broken", BROKEN_IMPORT)
    raising = write("raising", RAISING_HOOK)
    nameless = write("nameless", NAMELESS)

    registry = Registry()
    backends = registry.backends()
    records = {p.name: p for p in registry.plugins()}
    assert f"fdtest-good-{suffix}" in backends
    for name in BUILTIN:
        assert name in backends
    assert records[good].error is None and records[good].backends == [f"fdtest-good-{suffix}"]
    assert records[good].source.startswith("entry point")

    assert "import failed" in records[broken].error
    assert "ImportError" in records[broken].error and "a dependency of this plugin is missing" in records[broken].error
    assert records[broken].backends == []

    assert "RuntimeError" in records[raising].error and "fdtest: hook failed" in records[raising].error
    assert records[raising].backends == []

    assert "no name" in records[nameless].error
    assert records["builtin"].error is None


def test_entry_point_plugins_in_use(distribution, monkeypatch):
    """With a broken entry point installed, attention keeps working and the good plugin's backend
    is chosen when forced (the fresh registry stands in for the global one)."""
    write, suffix = distribution
    write("good", GOOD_PLUGIN.replace("{suffix}", suffix))
    broken = write("broken", BROKEN_IMPORT)
    registry = Registry()
    monkeypatch.setattr(flashdispatch.api, "REGISTRY", registry)
    monkeypatch.setattr(flashdispatch.dispatcher.selection, "REGISTRY", registry)
    flashdispatch.clear_decisions()
    try:
        assert any(p.name == broken and p.error for p in flashdispatch.plugins())
        q, k, v = (rand(1, 2, 5, 8) for _ in range(3))
        out = attention(q, k, v, backend=f"fdtest-good-{suffix}")
        assert_close(out, reference(q, k, v)[0], 1e-12)
        out = attention(q, k, v, causal=True)
        assert_close(out, reference(q, k, v, causal=True)[0], 1e-5)
        assert f"fdtest-good-{suffix}" in str(flashdispatch.explain(q, k, v))
    finally:
        flashdispatch.clear_decisions()


def test_broken_entry_point_logs_a_warning(distribution, caplog):
    write, _ = distribution
    broken = write("broken", BROKEN_IMPORT)
    with caplog.at_level("WARNING", logger="flashdispatch"):
        Registry().backends()
    assert any(broken in r.getMessage() and "disabled" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["named", "star"])
def test_disable_plugins_environment(distribution, monkeypatch, which):
    write, suffix = distribution
    good = write("good", GOOD_PLUGIN.replace("{suffix}", suffix))
    broken = write("broken", BROKEN_IMPORT)
    monkeypatch.setenv("FLASHDISPATCH_DISABLE_PLUGINS", f" {good} , {broken}" if which == "named" else "*")
    registry = Registry()
    backends = registry.backends()
    assert f"fdtest-good-{suffix}" not in backends
    for name in BUILTIN:  # the built-in plugin is not an entry point and stays
        assert name in backends
    records = {p.name: p for p in registry.plugins()}
    for name in (good, broken):
        assert "FLASHDISPATCH_DISABLE_PLUGINS" in records[name].error
    assert sys.modules.get(f"fdtest_broken_{suffix}") is None  # never imported


def test_disable_plugins_only_the_named_one(distribution, monkeypatch):
    write, suffix = distribution
    good = write("good", GOOD_PLUGIN.replace("{suffix}", suffix))
    broken = write("broken", BROKEN_IMPORT)
    monkeypatch.setenv("FLASHDISPATCH_DISABLE_PLUGINS", broken)
    registry = Registry()
    assert f"fdtest-good-{suffix}" in registry.backends()
    records = {p.name: p for p in registry.plugins()}
    assert records[good].error is None
    assert "FLASHDISPATCH_DISABLE_PLUGINS" in records[broken].error


def test_fresh_registry_is_independent_of_the_global_one():
    flashdispatch.register_backend(DoubleMath("test-global-only"))
    assert "test-global-only" not in Registry().backends()
    assert registry_module.REGISTRY.backends()["test-global-only"].name == "test-global-only"


def test_unregistering_a_run_time_backend_allows_registering_it_again():
    from flashdispatch import Backend, Support

    class Once(Backend):
        name = "test-once"
        support = Support(dtypes=(torch.float32,))

        def forward(self, q, k, v, problem, cu_seqlens_q=None, cu_seqlens_k=None):
            raise AssertionError("never run")

    flashdispatch.register_backend(Once())
    flashdispatch.unregister("test-once")
    assert "test-once" not in flashdispatch.backends()
    assert all(r.name != "backend:test-once" for r in flashdispatch.plugins())
    flashdispatch.register_backend(Once())  # the name is free again
    flashdispatch.unregister("test-once")
