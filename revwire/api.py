"""`revwire.rewire`: trace -> shapes -> match -> rewrite, and `revwire.report`."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import fx, nn

from .engine import stages
from .errors import InputError, NoChainError, RewireError
from .match import Residual, match, where
from .report import ChainInfo, Report, SkippedInfo
from .rewrite import _Unsupported, emit_chain
from .shapes import SHAPE, propagate
from .trace import scope_of, trace

_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


def _example_inputs(model: nn.Module, example_inputs) -> tuple:
    if example_inputs is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if not size:
            raise InputError(
                f"example_inputs are needed to rewire {type(model).__name__}: pass "
                f"revwire.rewire(model, torch.randn(1, C, H, W)) (or a tuple of the forward's tensors)"
            )
        p = next(iter(model.parameters()), None)
        return (torch.randn(1, *size, device=p.device if p is not None else "cpu",
                            dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32),)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
        f"{type(example_inputs).__name__}"
    )


def _block_label(r: Residual) -> str:
    """`scope [first module of the branch]`, e.g. `blocks.3 [norm2]` or `layer1.1 [conv1]`."""
    scope = scope_of(r.add)
    for node in r.add.graph.nodes:
        if node not in r.branch:
            continue
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module":
            paths.append(node.target)
        inner = [p for p in paths if p.startswith(scope + ".") or (not scope and p)]
        if inner:
            leaf = inner[0][len(scope) + 1:] if scope else inner[0]
            return f"{scope} [{leaf}]" if scope else leaf
    return scope or r.add.name


def _copy_plain_attributes(model: nn.Module, gm: fx.GraphModule) -> None:
    """Plain attributes users read on a model (timm's pretrained_cfg, num_classes, ...)."""
    plain = {name: value for name, value in vars(model).items()
             if not name.startswith("_") and not hasattr(gm, name)
             and isinstance(value, (int, float, str, bool, tuple, list, dict, type(None)))}
    _preserve(gm, **plain)


def _preserve(gm: fx.GraphModule, **attributes) -> None:
    """Set attributes that also survive `copy.deepcopy` (GraphModule keeps only these)."""
    gm.meta.setdefault(_PRESERVED, {}).update(attributes)
    for name, value in attributes.items():
        setattr(gm, name, value)


def rewire(
    model: nn.Module,
    example_inputs=None,
    *,
    min_blocks: int = 2,
    post_activation: str = "branch",
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence[Callable] = (),
    strict: bool = True,
    stream_dtype: Optional[torch.dtype] = None,
    engine: str = "reversible",
    check_finite: bool = True,
) -> nn.Module:
    """Return a reversible twin of `model` that shares its parameters.

    Every chain of at least `min_blocks` same-shape residual blocks runs as one
    `ReversibleStage`. The result is a `torch.fx.GraphModule` with the same call
    signature; its parameters are `model`'s own objects and its `state_dict()` keys
    equal `model`'s. See `revwire.report(result)` for what was converted.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"rewire expects an nn.Module, got {type(model).__name__}")
    if min_blocks < 1:
        raise ValueError(f"min_blocks must be >= 1, got {min_blocks}")
    inputs = _example_inputs(model, example_inputs)
    gm = trace(model, len(inputs), leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    propagate(gm, inputs)
    found = match(gm, min_blocks=min_blocks, post_activation=post_activation)
    report = Report(type(model).__name__)
    report.skipped = [SkippedInfo(s.where, s.reason) for s in found.skipped]
    # Last chain first: emitting a chain replaces its output node, which may be the next
    # chain's input; emitted in reverse, no chain ever holds a replaced node.
    for k, chain in reversed(list(enumerate(found.chains))):
        name = f"revwire_stage{k}"
        try:
            stage = emit_chain(gm, chain, name, _block_label, engine=engine, stream_dtype=stream_dtype,
                               check_finite=check_finite,
                               keep_last=k == len(found.chains) - 1)  # see ReversibleStage
        except _Unsupported as e:
            report.skipped.append(SkippedInfo(where(chain.output), f"chain not emitted: {e}"))
            continue
        report.chains.insert(0, ChainInfo(
            name=name,
            blocks=list(stage.names),
            shape=list(chain.input.meta[SHAPE]),
            num_blocks=len(chain.residuals),
            post_activations=sum(r.act is not None for r in chain.residuals),
            transitions=sum(1 for t in chain.transitions if t),
        ))
    if not report.chains:
        reasons = "; ".join(sorted({s.reason for s in report.skipped})[:4]) or "no residual add found"
        message = (f"no chain of >= {min_blocks} same-shape residual blocks found in "
                   f"{type(model).__name__} ({reasons})")
        if strict:
            raise NoChainError(message + ". Pass strict=False to get the model back unchanged.")
        warnings.warn(message + "; returning the model unchanged", stacklevel=2)
        return model
    for info in report.chains:  # registered in forward order, as emitted in reverse
        gm._modules[info.name] = gm._modules.pop(info.name)
    gm.graph.lint()
    gm.recompile()
    # the root's flag only: `gm.train()` would also reset the modes of the user's modules
    gm.training = model.training
    for stage in stages(gm):
        stage.training = model.training
    _copy_plain_attributes(model, gm)
    _check_same_parameters(model, gm)
    options = {
        "min_blocks": min_blocks, "post_activation": post_activation, "strict": strict,
        "stream_dtype": None if stream_dtype is None else str(stream_dtype).replace("torch.", ""),
        "check_finite": check_finite,
        "leaf_modules": [_qualified_name(c) for c in leaf_modules],
        "autowrap_functions": [_qualified_name(f) for f in autowrap_functions],
    }
    _preserve(gm, revwire_report=report, revwire_options=options,
              revwire_input_shapes=[list(t.shape) for t in inputs])
    return gm


def _qualified_name(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _check_same_parameters(model: nn.Module, gm: nn.Module) -> None:
    if set(model.state_dict().keys()) != set(gm.state_dict().keys()):
        missing = sorted(set(model.state_dict()) - set(gm.state_dict()))[:5]
        extra = sorted(set(gm.state_dict()) - set(model.state_dict()))[:5]
        raise RewireError(f"revwire internal error: state_dict keys differ (missing {missing}, extra {extra})")


def report(rewired: nn.Module) -> Report:
    """The chains `rewire` converted in `rewired`, and what it skipped and why."""
    rep = getattr(rewired, "revwire_report", None)
    if rep is None:
        raise RewireError(f"{type(rewired).__name__} was not produced by revwire.rewire")
    return rep
