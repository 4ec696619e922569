"""The three methods compared, derived from one model so that they share its parameters.

- `vanilla`:    the original model.
- `checkpoint`: the same modules, with every residual block run under
                `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
- `revwire`:    `revwire.rewire(model, example)` with the reversible engine.

Which modules are "residual blocks" is found generically: the module that contains
each residual add revwire found (the scope of its `revwire.report` labels: ViT
`blocks.i`, Swin `layers.k.blocks.i`, ResNet `layerN.i`, swin3d `features.k.i`), then
every module of the same class in the model, so that blocks revwire leaves out of its
chains (ResNet's first bottleneck per stage, with its projection shortcut) are
checkpointed too: the fair alternative checkpoints every block.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import revwire

METHODS = ("vanilla", "checkpoint", "revwire")

# While True, checkpoint wrappers expose the block inputs they keep for backward to
# saved-tensor hooks (see `_Retain`), so that `revwire.saved_tensor_bytes` counts them.
_METER = {"on": False}


@contextlib.contextmanager
def metering():
    """Count what checkpointed blocks keep alive (their inputs) as saved tensors."""
    old = _METER["on"]
    _METER["on"] = True
    try:
        yield
    finally:
        _METER["on"] = old


class _Retain(torch.autograd.Function):
    """Identity that saves its input: makes a checkpoint's kept input visible to
    `saved_tensors_hooks` (the checkpoint itself holds it in a closure, which no hook
    sees). Used only while metering; same storage, so it is counted once."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Checkpointed(nn.Module):
    """Run `inner` under non-reentrant activation checkpointing while training with grad."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        if _METER["on"]:
            args = tuple(_Retain.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
                         for a in args)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def residual_scopes(rev: nn.Module) -> List[str]:
    """Module paths that contain the residual adds revwire converted."""
    scopes = []
    for chain in revwire.report(rev).chains:
        for scope in chain.block_scopes:
            if scope and scope not in scopes:
                scopes.append(scope)
    return scopes


def checkpoint_targets(model: nn.Module, rev: nn.Module) -> List[str]:
    """Names of the modules to checkpoint: every module whose class is that of a module
    holding a residual add, outermost only (a block inside a checkpointed block is not
    wrapped again)."""
    named = dict(model.named_modules())
    scopes = [s for s in residual_scopes(rev) if s in named]
    if not scopes:
        raise RuntimeError(f"no residual block found to checkpoint in {type(model).__name__}")
    types = tuple({type(named[s]) for s in scopes})
    targets: List[str] = []
    for name, module in model.named_modules():
        if name and isinstance(module, types) and not any(name.startswith(t + ".") for t in targets):
            targets.append(name)
    return targets


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes, parameters, buffers and children,
    but its own child table (so children can be replaced without touching `module`)."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def with_checkpoints(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """A twin of `model` (same parameter and module objects) whose `targets` run under
    `torch.utils.checkpoint`. Only the modules on the paths to the targets are copied
    (shallowly); `model` itself is unchanged."""
    root = _shallow(model)
    copies: Dict[str, nn.Module] = {"": root}
    for target in targets:
        parts = target.split(".")
        parent = root
        for depth in range(1, len(parts)):
            path = ".".join(parts[:depth])
            if path not in copies:
                copies[path] = _shallow(parent._modules[parts[depth - 1]])
                parent._modules[parts[depth - 1]] = copies[path]
            parent = copies[path]
        parent._modules[parts[-1]] = Checkpointed(parent._modules[parts[-1]])
    return root


def prepare(model: nn.Module, example: torch.Tensor, methods: Sequence[str] = METHODS,
            ) -> Tuple[Dict[str, nn.Module], Dict[str, object]]:
    """The methods' models for inputs shaped like `example` (which is only used to trace).

    Returns ({method: module}, info) with info = {"checkpointed": n blocks, "chains": [...]}.
    All modules share `model`'s parameters.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
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
        else:
            out[m] = rev
    return out, info
