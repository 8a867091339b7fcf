"""The backend registry: a pluggy plugin manager, the built-in plugin, entry-point plugins.

Loading is lazy (the first call that needs a backend) and never fatal: a plugin that fails to
import, to register or to return valid backends is recorded with its error and skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from ..backends.base import Backend
from ..plugins import builtin, hookspecs

ENTRY_POINT_GROUP = "flashdispatch"
log = logging.getLogger("flashdispatch")


@dataclass
class PluginRecord:
    """One plugin as `info` shows it."""

    name: str
    source: str  # "built-in", "entry point <value>", "run time"
    backends: list[str] = field(default_factory=list)
    error: str | None = None  # why it is disabled, if it is


def _backend_problem(backend) -> str | None:
    """Why `backend` is not a usable backend object, or None."""
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        return f"{backend!r} has no name (a non-empty str attribute 'name')"
    for attr in ("support", "forward", "not_supported_reasons", "backward_not_supported_reasons"):
        if not hasattr(backend, attr):
            return f"backend {name!r} has no attribute {attr!r} (subclass flashdispatch.Backend)"
    if isinstance(backend, Backend) and type(backend).forward is Backend.forward:
        return f"backend {name!r} does not implement forward()"
    return None


class Registry:
    def __init__(self):
        self._manager: pluggy.PluginManager | None = None
        self._backends: dict[str, object] = {}
        self._records: dict[str, PluginRecord] = {}

    # Loading

    def _load(self) -> pluggy.PluginManager:
        if self._manager is not None:
            return self._manager
        manager = pluggy.PluginManager("flashdispatch")
        manager.add_hookspecs(hookspecs)
        self._manager = manager
        self._add(builtin, "builtin", "built-in")
        disabled = {n.strip() for n in os.environ.get("FLASHDISPATCH_DISABLE_PLUGINS", "").split(",") if n.strip()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in disabled or "*" in disabled:
                self._records[ep.name] = PluginRecord(ep.name, f"entry point {ep.value}", error="disabled by FLASHDISPATCH_DISABLE_PLUGINS")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the dispatcher
                self._fail(PluginRecord(ep.name, f"entry point {ep.value}"), f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._add(plugin, ep.name, f"entry point {ep.value}")
        return manager

    def _fail(self, record: PluginRecord, error: str) -> None:
        record.error = error
        self._records[record.name] = record
        log.warning("flashdispatch plugin %r disabled: %s", record.name, error)

    def _add(self, plugin, name: str, source: str) -> PluginRecord:
        record = PluginRecord(name, source)
        if name in self._records and self._records[name].error is None:
            record.error = f"a plugin named {name!r} is already registered"
            log.warning("flashdispatch plugin %r not added: %s", name, record.error)
            return record
        try:
            self._manager.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001
            self._fail(record, f"registration failed: {type(exc).__name__}: {exc}")
            return record
        impls = [i for i in self._manager.hook.flashdispatch_backends.get_hookimpls() if i.plugin_name == name]
        try:
            backends = [backend for impl in impls for backend in impl.function()]
            for backend in backends:
                problem = _backend_problem(backend)
                if problem is None and backend.name in self._backends:
                    problem = f"backend name {backend.name!r} is already registered"
                if problem:
                    raise ValueError(problem)
        except Exception as exc:  # noqa: BLE001
            self._manager.unregister(plugin)
            self._fail(record, f"flashdispatch_backends() failed: {type(exc).__name__}: {exc}")
            return record
        for backend in backends:
            self._backends[backend.name] = backend
            record.backends.append(backend.name)
        self._records[name] = record
        return record

    # Queries

    def backends(self) -> dict[str, object]:
        """Registered backends by name, in registration order."""
        self._load()
        return dict(self._backends)

    def get(self, name: str):
        backends = self.backends()
        if name not in backends:
            raise ValueError(f"backend must be one of {sorted(backends)}, got {name!r}")
        return backends[name]

    def plugins(self) -> list[PluginRecord]:
        self._load()
        return list(self._records.values())

    # Changes at run time

    def register_plugin(self, plugin, name: str | None = None) -> PluginRecord:
        """Register a plugin object; raises ValueError (and registers nothing) if it is broken."""
        self._load()
        name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        record = self._add(plugin, name, "run time")
        if record.error:
            if self._records.get(name) is record:
                del self._records[name]
            raise ValueError(f"plugin {name!r} was not registered: {record.error}")
        return record

    def unregister(self, name: str) -> None:
        """Remove the plugin `name` with its backends, or else the one backend `name`."""
        self._load()
        owner = next((r for r in self._records.values() if name in r.backends), None)
        if name not in self._records and owner is not None:
            owner.backends.remove(name)
            del self._backends[name]
            if owner.backends or owner.source != "run time":
                return
            name = owner.name  # a run-time plugin left with no backend goes too
        record = self._records.get(name)
        if record is None:
            raise ValueError(f"no plugin or backend named {name!r} is registered")
        plugin = self._manager.get_plugin(record.name)
        if plugin is not None:
            self._manager.unregister(plugin)
        for backend in record.backends:
            self._backends.pop(backend, None)
        del self._records[record.name]


class _SingleBackendPlugin:
    """Wraps one backend object as a plugin, for `register_backend`."""

    def __init__(self, backend):
        self.backend = backend

    @hookspecs.hookimpl
    def flashdispatch_backends(self):
        return [self.backend]


REGISTRY = Registry()


def register_backend(backend) -> None:
    """Register one backend object at run time (a plugin in one line)."""
    problem = _backend_problem(backend)
    if problem:
        raise ValueError(problem)
    REGISTRY.register_plugin(_SingleBackendPlugin(backend), name=f"backend:{backend.name}")
