"""hookloop-gradnorm: log the total gradient norm every N optimizer steps.

The norm is computed on the device as a tensor, only on the steps where it is due, and
handed to ``loop.log``; the loop reduces it together with the other metrics at its log
interval. So the plugin adds no host-device synchronisation on any step::

    from hookloop import Loop

    loop = Loop(model, optimizer, train_data, loss_fn=loss_fn,
                plugins=[("gradnorm", {"every_n_steps": 10})])
    loop.fit(max_epochs=3)   # trackers receive "grad/norm" (and "grad/norm_epoch")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from hookloop import hookimpl, only

if TYPE_CHECKING:
    from hookloop import Loop

__all__ = ["GradNorm", "total_norm"]

__version__ = "0.1.0"


def total_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
    """The ``norm_type``-norm of the gradients of ``parameters`` taken together, as a
    0-d tensor on their device (no host-device sync), or ``None`` when no parameter has
    a gradient. Same value as ``torch.nn.utils.clip_grad_norm_`` returns.

    :param parameters: tensors whose ``.grad`` is measured; those without one are skipped.
    :param norm_type: the order of the norm (``2.0``, ``1.0``, ``math.inf``, ...).
    """
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


class GradNorm:
    """Log the total gradient norm of the parameters each optimizer steps, every
    ``every_n_steps`` optimizer steps.

    The norm is measured in ``on_before_optimizer_step``, i.e. after gradient
    accumulation, unscaling (mixed precision) and the loop's clipping: it is the norm of
    the gradients the optimizer is about to apply. It is measured when
    ``loop.state.global_step % every_n_steps == 0`` (steps done so far: the first
    measurement is taken before the first step) and arrives at the trackers at the next
    log interval, as the mean of the values measured in that interval, and at the end of
    the epoch as ``<name>_epoch``.

    :param every_n_steps: optimizer steps between two measurements.
    :param norm_type: order of the norm (``2.0`` by default; ``math.inf`` for the max).
    :param name: metric name. With several optimizers, the index of the optimizer is
        appended (``grad/norm/0``, ``grad/norm/1``, ...).
    """

    #: the name the plugin registers under when passed as an object
    hookloop_name = "gradnorm"
    #: a failing measurement warns once and training continues
    hookloop_on_error = "warn"
    # Not rank-zero-only on purpose: ``loop.log`` values are averaged across ranks by a
    # collective that every rank must join with the same metric names.

    def __init__(self, every_n_steps: int = 50, norm_type: float = 2.0, name: str = "grad/norm") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive int; got {every_n_steps!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not (
            norm_type > 0 or math.isinf(norm_type)
        ):
            raise ValueError(f"norm_type must be a positive number or math.inf; got {norm_type!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        self.every_n_steps = every_n_steps
        self.norm_type = float(norm_type)
        self.name = name

        # The frequency depends on an option, so each instance replaces the class's
        # implementation with one carrying its own filter: the loop's compiled call
        # plan evaluates it inline and does not call the plugin at all on other steps.
        @hookimpl
        @only(every_n_steps=every_n_steps)
        def on_before_optimizer_step(loop: Loop, optimizer: torch.optim.Optimizer) -> None:
            self.measure(loop, optimizer)

        self.on_before_optimizer_step = on_before_optimizer_step  # type: ignore[method-assign]

    @hookimpl
    def on_before_optimizer_step(self, loop: Loop, optimizer: torch.optim.Optimizer) -> None:
        """Measure and log the norm. Declared on the class so that ``hookloop plugins``
        lists the hook; every instance shadows it with a copy filtered by its
        ``every_n_steps`` (see ``__init__``)."""
        self.measure(loop, optimizer)

    def metric_name(self, loop: Loop, optimizer: torch.optim.Optimizer) -> str:
        """The metric name for ``optimizer``: :attr:`name`, with the optimizer's index
        appended when the loop has several optimizers."""
        optimizers = loop.optimizers
        if len(optimizers) > 1:
            for i, opt in enumerate(optimizers):
                if opt is optimizer:
                    return f"{self.name}/{i}"
        return self.name

    def measure(self, loop: Loop, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Compute the gradient norm of ``optimizer``'s parameters and ``loop.log`` it
        (a device tensor; nothing is synchronised). Returns the tensor, or ``None``
        when no parameter has a gradient (nothing is logged then)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = total_norm(params, self.norm_type)
        if norm is not None:
            loop.log(self.metric_name(loop, optimizer), norm)
        return norm

    def __repr__(self) -> str:
        return (
            f"GradNorm(every_n_steps={self.every_n_steps}, norm_type={self.norm_type}, "
            f"name={self.name!r})"
        )
