"""hookloop: a minimal, fast, event-driven PyTorch training loop; features are plugins."""

from hookloop._dispatch import only
from hookloop.errors import MonitorNotFoundError
from hookloop.loop import Loop
from hookloop.metrics import MetricStamp
from hookloop.plugins import PluginError, PluginManager, available_plugins, hookimpl
from hookloop.resume import ResumeError, state_key
from hookloop.state import LoopState

__all__ = [
    "Loop",
    "LoopState",
    "MetricStamp",
    "MonitorNotFoundError",
    "PluginError",
    "PluginManager",
    "ResumeError",
    "__version__",
    "available_plugins",
    "hookimpl",
    "only",
    "state_key",
]

__version__ = "0.2.0"
