"""The `torch.utils.checkpoint` twin of a model: the fair alternative revwire is compared to
(by `revwire inspect` and the benchmarks), sharing the model's parameters.

Which modules are "residual blocks" is found generically: the module that contains each
residual add revwire converted (the scope of its `revwire.report` labels: ViT `blocks.i`,
Swin `layers.k.blocks.i`, ResNet `layerN.i`, swin3d `features.k.i`), then every module of
the same class in the model, so that blocks revwire leaves out of its chains (ResNet's
first bottleneck per stage, with its projection shortcut) are checkpointed too.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..api import report
from ..errors import NoChainError


class Checkpointed(nn.Module):
    """Run `inner` under non-reentrant activation checkpointing while training with grad."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def residual_scopes(rev: nn.Module) -> List[str]:
    """Module paths that contain the residual adds revwire converted in `rev`."""
    scopes = []
    for chain in report(rev).chains:
        for scope in chain.block_scopes:
            if scope and scope not in scopes:
                scopes.append(scope)
    return scopes


def checkpoint_targets(model: nn.Module, rev: nn.Module) -> List[str]:
    """Names of the modules of `model` to checkpoint: every module whose class is that of
    a module holding a residual add of `rev` (its rewired twin), outermost only (a block
    inside a checkpointed block is not wrapped again)."""
    named = dict(model.named_modules())
    scopes = [s for s in residual_scopes(rev) if s in named]
    if not scopes:
        raise NoChainError(f"no residual block found to checkpoint in {type(model).__name__}")
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


def checkpoint_twin(model: nn.Module, rev: nn.Module) -> nn.Module:
    """`model` with every residual block (as `rev`, its rewired twin, found them) under
    non-reentrant `torch.utils.checkpoint`; same parameters, `model` unchanged."""
    return with_checkpoints(model, checkpoint_targets(model, rev))
