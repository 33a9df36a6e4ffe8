"""hookloop: a minimal, fast, event-driven PyTorch training loop; features are plugins."""

from hookloop._dispatch import only
from hookloop.loop import Loop
from hookloop.plugins import PluginError, PluginManager, available_plugins, hookimpl
from hookloop.state import LoopState

__all__ = [
    "Loop",
    "LoopState",
    "PluginError",
    "PluginManager",
    "__version__",
    "available_plugins",
    "hookimpl",
    "only",
]

__version__ = "0.1.0"
