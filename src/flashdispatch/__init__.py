"""flashdispatch: one `attention()` call that runs the fastest exact attention kernel this machine has.

    import flashdispatch
    out = flashdispatch.attention(q, k, v, causal=True)
    print(flashdispatch.explain(q, k, v, causal=True))   # what runs, and why the others do not
    print(flashdispatch.capabilities())                  # what this GPU is and can do
"""

from .api import (
    attention,
    backends,
    clear_decisions,
    configure,
    explain,
    plugins,
    register_backend,
    register_plugin,
    unregister,
)
from .backends.base import Backend, Support
from .dispatcher.capabilities import Capabilities, capabilities
from .dispatcher.problem import Problem
from .dispatcher.selection import Explanation, NoBackendError
from .merge import merge_states
from .plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Capabilities",
    "Explanation",
    "NoBackendError",
    "Problem",
    "Support",
    "attention",
    "backends",
    "capabilities",
    "clear_decisions",
    "configure",
    "explain",
    "hookimpl",
    "merge_states",
    "plugins",
    "register_backend",
    "register_plugin",
    "unregister",
]
