"""`CheckpointedSegment`: a piece of the model outside the reversible stages, recomputed in
backward instead of stored (the `checkpoint_rest` option).

Forward runs the segment without grad and keeps only its input; backward recomputes it with
grad under the forward's RNG and autocast state, with train-mode norms frozen so that their
running statistics count the batch once (`torch.utils.checkpoint` counts it twice), then
returns the gradients of the input and of the segment's parameters through autograd (DDP
hooks, gradient accumulation and `torch.autograd.grad` work as for a stage). See
docs/design.md §3 for the recompute contract.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
from torch import fx, nn
from torch.autograd.function import once_differentiable

from ..errors import RewireError
from .engine import foreign_grad_tensors
from .replay import AutocastState, RngState, bound_params, frozen_running_stats, stat_tracking_norms


class CheckpointedSegment(nn.Module):
    """Run `body` (a graph calling the model's own modules) with its activations recomputed.

    `body` is not registered: its modules are registered where they live in the model, so
    parameter names and `state_dict()` keys stay the original's. `recompute=False` runs the
    same body with plain autograd (the ground truth the tests compare against).
    """

    def __init__(self, body: fx.GraphModule, name: str, scope: str):
        super().__init__()
        self.__dict__["body"] = body
        self.name = name
        self.scope = scope
        self.recompute = True
        self.slots = [(m, n) for m in body.modules() for n, p in m._parameters.items() if p is not None]
        self.norms = stat_tracking_norms(body.modules())
        self._checked = False

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scope={self.scope!r}, recompute={self.recompute}"

    def params(self) -> List[nn.Parameter]:
        """The segment's parameters that require grad, each once, in a fixed order."""
        seen: dict = {}
        for m, n in self.slots:
            p = m._parameters.get(n)
            if p is not None and p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # A traced root-level `F.dropout(training=self.training)` reads the body's own flag.
        self.body.training = self.training
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.params()
        if self.recompute and torch.is_grad_enabled() and (x.requires_grad or params):
            return _Segment.apply(self, x, *params)
        return self._run(x)

    def check_leaves(self, y: torch.Tensor, leaves: list) -> None:
        """Once: the recompute reads no trainable tensor besides its input and parameters,
        whose gradient this Function could not return."""
        if self._checked:
            return
        foreign = foreign_grad_tensors(y, leaves)
        if foreign:
            raise RewireError(
                f"segment '{self.name}' ({self.scope or 'top level'}) reads {len(foreign)} tensor(s) "
                f"that require grad but are not its parameters (shapes {foreign[:4]}); rewire "
                f"without checkpoint_rest")
        self._checked = True


class _Segment(torch.autograd.Function):
    """forward(segment, x, *params) -> segment(x), keeping only x (and the replay state)."""

    @staticmethod
    def forward(ctx, seg: CheckpointedSegment, x: torch.Tensor, *params):
        ctx.seg, ctx.params = seg, params
        ctx.rng = RngState.capture(x.device)
        ctx.autocast = AutocastState.capture(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            y = seg._run(x)
        if not isinstance(y, torch.Tensor):
            raise RewireError(f"segment '{seg.name}' returned {type(y).__name__}, not a tensor")
        # NOTE [ A segment's output is never an alias of its input ]
        # A body that ends in a view of x (flatten) would return a view of a Function
        # input, which autograd treats as a view (and in-place ops on it would rebase
        # through x). Segments are emitted only around modules with parameters, so this
        # is rare; a copy then costs one output's size and keeps autograd's rules plain.
        if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            y = y.clone()
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        seg, params = ctx.seg, ctx.params
        aliases = [p.detach().requires_grad_(True) for p in params]
        with contextlib.ExitStack() as stack:
            stack.enter_context(ctx.rng.replay())
            stack.enter_context(ctx.autocast.replay())
            stack.enter_context(frozen_running_stats(seg.norms))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(bound_params(seg.slots, dict(zip(map(id, params), aliases))))
            inp = x.detach().requires_grad_(x.requires_grad)
            y = seg._run(inp)
        leaves = ([inp] if x.requires_grad else []) + aliases
        seg.check_leaves(y, leaves)
        if y.requires_grad:
            grads = torch.autograd.grad(y, leaves, grad_outputs=g.to(y.dtype), allow_unused=True)
        else:
            grads = (None,) * len(leaves)
        del y
        g_x = grads[0] if x.requires_grad else None
        return (None, g_x, *grads[len(leaves) - len(aliases):])


def segments(module: nn.Module) -> List[CheckpointedSegment]:
    """All checkpointed segments inside `module`."""
    return [m for m in module.modules() if isinstance(m, CheckpointedSegment)]
