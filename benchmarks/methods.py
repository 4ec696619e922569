"""The three methods compared, derived from one model so that they share its parameters.

- `vanilla`:    the original model.
- `checkpoint`: the same modules, with every residual block run under
                `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`
                (`revwire.tools.twins`: which modules are blocks, and why).
- `revwire`:    `revwire.rewire(model, example)` with the reversible engine.
- `revwire_rest`: the same with `checkpoint_rest=True` (what stays outside the reversible
                stages is recomputed too); opt-in: `--methods ... revwire_rest`.
- `vanilla_sdpa`, `checkpoint_sdpa`, `revwire_sdpa`: the three with explicit attention
                computed through `F.scaled_dot_product_attention` (revwire's `sdpa_attention`
                pass; for the first two, a twin whose attention modules run the pass's function),
                so that the pass is compared method for method; opt-in.
"""
from __future__ import annotations

import copy
import types
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

import revwire
from revwire.compiler.attention import is_explicit_attention, window_attention_3d
from revwire.tools.twins import checkpoint_targets, with_checkpoints

METHODS = ("vanilla", "checkpoint", "revwire")
SDPA_METHODS = tuple(f"{m}_sdpa" for m in METHODS)
ALL_METHODS = METHODS + ("revwire_rest",) + SDPA_METHODS


def with_sdpa_attention(model: nn.Module) -> nn.Module:
    """A twin of `model` (same parameters) whose explicit-attention modules compute their
    attention as revwire's `sdpa_attention` pass makes them: each is a shallow copy whose
    forward is the pass's function. `model` is unchanged."""
    def twin(module: nn.Module) -> nn.Module:
        if is_explicit_attention(module):
            out = copy.copy(module)
            out.forward = types.MethodType(window_attention_3d, out)
            return out
        children = {name: twin(child) for name, child in module._modules.items() if child is not None}
        if all(new is module._modules[name] for name, new in children.items()):
            return module
        out = copy.copy(module)
        out._modules = {**module._modules, **children}
        return out

    return twin(model)


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
        elif m == "vanilla_sdpa":
            out[m] = with_sdpa_attention(model)
        elif m in ("checkpoint", "checkpoint_sdpa"):
            targets = checkpoint_targets(model, rev)
            info["checkpointed"] = len(targets)
            out[m] = with_checkpoints(with_sdpa_attention(model) if m == "checkpoint_sdpa" else model, targets)
        elif m == "revwire_sdpa":
            sdpa = revwire.rewire(model, example[:1], sdpa_attention=True)
            sdpa.train(training)
            info["attention_sites"] = revwire.report(sdpa).attention_sites
            out[m] = sdpa
        elif m == "revwire_rest":
            rest = revwire.rewire(model, example[:1], checkpoint_rest=True)
            rest.train(training)
            info["segments"] = len(revwire.report(rest).segments)
            out[m] = rest
        else:
            out[m] = rev
    return out, info
