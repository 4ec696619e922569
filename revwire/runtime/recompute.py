"""`CheckpointedSegment`: a piece of the model outside the reversible stages, recomputed in
backward instead of stored (the `checkpoint_rest` option).

Forward keeps only the segment's input; backward recomputes it under the forward's RNG and
autocast state, and train-mode norms count the batch once (`torch.utils.checkpoint` alone
counts it twice). See docs/design.md §3 for the recompute contract.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from .replay import scratch_running_stats, stat_tracking_norms

# NOTE [ Why non-reentrant checkpoint, not a Function of our own ]
# A Function that recomputes the segment and returns every parameter's gradient together
# (as `autograd.grad` does) holds all of a block's weight gradients at once: on resnet18
# layer4.1, two 9 MiB conv gradients, which put the step's activation peak above that of
# `torch.utils.checkpoint` per block. Non-reentrant checkpoint recomputes into the
# forward's own graph, so each parameter's gradient reaches its AccumulateGrad as soon as
# its op is done, and DDP hooks, gradient accumulation, `p.register_hook` and
# `torch.autograd.grad` see ordinary autograd. It replays the CPU and the input device's
# RNG state and the forward's autocast; what it lacks is that BatchNorm updates its running
# statistics again in the recompute, which `scratch_running_stats` takes away.

# NOTE [ Making the kept input visible ]
# A checkpoint keeps its input in a closure, which `saved_tensors_hooks` (and so
# `revwire.saved_tensor_bytes`) never sees. `_Kept` saves the same storage for backward, so
# what the segment keeps is counted, once; it costs nothing else.


class _Kept(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


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
        self.norms = stat_tracking_norms(body.modules())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scope={self.scope!r}, recompute={self.recompute}"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # A traced top-level `F.dropout(training=self.training)` reads the body's own flag.
        self.body.training = self.training
        return self.body(x)

    def _contexts(self):
        return contextlib.nullcontext(), scratch_running_stats(self.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and torch.is_grad_enabled()):
            return self._run(x)
        if x.requires_grad:
            x = _Kept.apply(x)
        return checkpoint(self._run, x, use_reentrant=False, context_fn=self._contexts)


def segments(module: nn.Module) -> List[CheckpointedSegment]:
    """All checkpointed segments inside `module`."""
    return [m for m in module.modules() if isinstance(m, CheckpointedSegment)]
