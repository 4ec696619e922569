"""The three methods compared, derived from one model so that they share its parameters.

- `vanilla`:    the original model.
- `checkpoint`: the same modules, with every residual block run under
                `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`
                (`revwire.tools.twins`: which modules are blocks, and why).
- `revwire`:    `revwire.rewire(model, example)` with the reversible engine.
- `revwire_rest`: the same with `checkpoint_rest=True` (what stays outside the reversible
                stages is recomputed too); opt-in: `--methods ... revwire_rest`.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

import revwire
from revwire.tools.twins import checkpoint_targets, with_checkpoints

METHODS = ("vanilla", "checkpoint", "revwire")
ALL_METHODS = METHODS + ("revwire_rest",)


def prepare(model: nn.Module, example: torch.Tensor, methods: Sequence[str] = METHODS,
            ) -> Tuple[Dict[str, nn.Module], Dict[str, object]]:
    """The methods' models for inputs shaped like `example` (which is only used to trace).

    Returns ({method: module}, info) with info = {"checkpointed": n blocks, "chains": [...]}.
    All modules share `model`'s parameters.
    """
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {ALL_METHODS}")
    training = model.training
    rev = revwire.rewire(model, example[:1])
    revwire.set_engine(rev, "reversible")
    rev.train(training)
    out: Dict[str, nn.Module] = {}
    info: Dict[str, object] = {"chains": [c.num_blocks for c in revwire.report(rev).chains]}
    for m in methods:
        if m == "vanilla":
            out[m] = model
        elif m == "checkpoint":
            targets = checkpoint_targets(model, rev)
            info["checkpointed"] = len(targets)
            out[m] = with_checkpoints(model, targets)
        elif m == "revwire_rest":
            rest = revwire.rewire(model, example[:1], checkpoint_rest=True)
            rest.train(training)
            info["segments"] = len(revwire.report(rest).segments)
            out[m] = rest
        else:
            out[m] = rev
    return out, info
