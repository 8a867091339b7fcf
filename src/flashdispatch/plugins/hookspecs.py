"""The hooks a flashdispatch plugin implements. This module holds the specifications alone.

A plugin is any module or object with functions marked `@flashdispatch.hookimpl`. Third-party
plugins are found through the entry-point group ``flashdispatch``::

    # pyproject.toml of the plugin's package
    [project.entry-points.flashdispatch]
    my_kernels = "my_package.flashdispatch_plugin"

or registered at run time with `flashdispatch.register_plugin(obj)` (or, for one backend,
`flashdispatch.register_backend(backend)`). The built-in backends are registered the same way,
by `flashdispatch.plugins.builtin`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("flashdispatch")
hookimpl = pluggy.HookimplMarker("flashdispatch")


@hookspec
def flashdispatch_backends():
    """Return the backends this plugin provides: an iterable of `flashdispatch.Backend` instances.

    Called once, when the registry is first used (and again after `register_plugin`). Keep it
    cheap and free of device work: import heavy toolchains lazily inside the backend, and report a
    missing toolchain through `Backend.unavailable_reasons()` rather than by raising. A plugin
    whose hook raises is disabled, with the error shown by `flashdispatch info`; the others go on.
    """
