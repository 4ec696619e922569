"""`revwire.rewire`: trace -> shapes -> match -> rewrite, and `revwire.report`."""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from torch import fx, nn

from .compiler.attention import sdpa_attention
from .compiler.match import match
from .compiler.normalize import readable_asserts, unbind_unpacked_tensors
from .compiler.report import Report
from .compiler.rewrite import rewrite
from .compiler.segments import checkpoint_segments
from .compiler.shapes import propagate
from .compiler.trace import RootInputs, bind_inputs, trace
from .errors import InputError, NoChainError, RewireError
from .options import RewireOptions
from .runtime.recompute import segments
from .runtime.stage import stages

_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


def _example_inputs(model: nn.Module, example_inputs) -> RootInputs:
    """The example inputs, bound to the forward's parameters.

    A tensor; a tuple (or list) of the forward's positional inputs, each a tensor or a
    list / tuple / dict of tensors; or a dict of keyword inputs (constants allowed).
    """
    if example_inputs is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if not size:
            raise InputError(
                f"example_inputs are needed to rewire {type(model).__name__}: pass "
                f"revwire.rewire(model, torch.randn(1, C, H, W)) (or a tuple of the forward's inputs, "
                f"or a dict of keyword inputs)"
            )
        p = next(iter(model.parameters()), None)
        example_inputs = torch.randn(1, *size, device=p.device if p is not None else "cpu",
                                     dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    if isinstance(example_inputs, torch.Tensor):
        return bind_inputs(model, (example_inputs,))
    if isinstance(example_inputs, dict) and example_inputs and all(isinstance(k, str) for k in example_inputs):
        return bind_inputs(model, (), example_inputs)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return bind_inputs(model, tuple(example_inputs))
    raise InputError(
        f"example_inputs must be a tensor, a non-empty tuple of the forward's inputs (tensors, or "
        f"lists of tensors) or a dict of keyword inputs, got {type(example_inputs).__name__}"
    )


_LAYOUTS = {3: "(batch, C, L)", 4: "(batch, C, H, W)", 5: "(batch, C, T, H, W)"}


def _input_rank(model: nn.Module) -> Optional[int]:
    """The rank of the model's (first) input, where the model says it: timm's
    `pretrained_cfg["input_size"]`, else a convolution as its first layer with weights."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return len(cfg["input_size"]) + 1
    first = next((m for m in model.modules()
                  if not next(m.children(), None) and next(m.parameters(recurse=False), None) is not None), None)
    return first.weight.dim() if isinstance(first, nn.modules.conv._ConvNd) else None


def _check_rank(model: nn.Module, inputs: tuple) -> None:
    """An `InputError` saying the rank the model takes, when the first input has another."""
    rank, x = _input_rank(model), inputs[0] if inputs else None
    if rank is not None and isinstance(x, torch.Tensor) and x.dim() != rank:
        layout = _LAYOUTS.get(rank, f"with {rank} dimensions")
        raise InputError(
            f"{type(model).__name__} takes {rank}-D inputs {layout}, but the example input has shape "
            f"{tuple(x.shape)} ({x.dim()}-D): pass a batch of shape {layout}"
        )


def _compiled_module(model: nn.Module) -> Optional[nn.Module]:
    """The module inside `torch.compile(module)` (an OptimizedModule), else None."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile loaded it (slow to import)
    return model._orig_mod if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule) else None


def _input_shapes(inputs: RootInputs) -> list:
    """[B, C, H, W] per positional input; a list of such for a list input."""
    def shape(v):
        if isinstance(v, torch.Tensor):
            return list(v.shape)
        if isinstance(v, dict):
            return {k: shape(x) for k, x in v.items()}
        return [shape(x) for x in v]
    return [shape(v) for v in inputs.values]


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


def rewire(model: nn.Module, example_inputs=None, options: Optional[RewireOptions] = None,
           **option_values) -> nn.Module:
    """Return a reversible twin of `model` that shares its parameters.

    Every chain of at least `min_blocks` same-shape residual blocks runs as one
    `ReversibleStage`. The result is a `torch.fx.GraphModule` with the same call
    signature; its parameters are `model`'s own objects and its `state_dict()` keys
    equal `model`'s. `example_inputs`: a tensor, a tuple of the forward's positional
    inputs (each a tensor or a list / tuple / dict of tensors: `([slow, fast],)`), or a
    dict of keyword inputs. Options (`min_blocks`, `post_activation`, `leaf_modules`,
    `not_leaf`, `autowrap_functions`, `capture`, `strict`, `stream_dtype`, `engine`,
    `check_finite`, `checkpoint_rest`, `sdpa_attention`) are the fields of `revwire.RewireOptions`: pass them
    as keywords, or as `options=`.
    See `revwire.report(result)` for what was converted. A `torch.compile`d model is
    rewired through the module it compiles (`_orig_mod`), with a warning: compile the
    result again.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"rewire expects an nn.Module, got {type(model).__name__}")
    given, model = model, _compiled_module(model) or model
    opts = RewireOptions.from_kwargs(options, **option_values)
    inputs = _example_inputs(model, example_inputs)
    gm = trace(model, inputs, leaf_modules=opts.leaf_modules, autowrap_functions=opts.autowrap_functions,
               not_leaf=opts.not_leaf, capture=opts.capture)
    readable_asserts(gm)
    attention_sites = sdpa_attention(gm) if opts.sdpa_attention else 0
    try:
        propagate(gm, inputs.call_args)
    except InputError:
        _check_rank(model, inputs.call_args)
        raise
    unbind_unpacked_tensors(gm)
    found = match(gm, min_blocks=opts.min_blocks, post_activation=opts.post_activation)
    report = rewrite(gm, found, opts, type(model).__name__)
    report.capture = gm.meta.get("revwire_capture", "symbolic")
    report.decisions = list(dict.fromkeys(gm.meta.get("revwire_decisions", [])))
    report.attention_sites = attention_sites
    if not report.chains:
        reasons = "; ".join(sorted({s.reason for s in report.skipped})[:4]) or "no residual add found"
        message = (f"no chain of >= {opts.min_blocks} same-shape residual blocks found in "
                   f"{type(model).__name__} ({reasons})")
        if opts.strict:
            raise NoChainError(message + ". Pass strict=False to get the model back unchanged.")
        warnings.warn(message + "; returning the model unchanged", stacklevel=2)
        return given
    if opts.checkpoint_rest:
        checkpoint_segments(gm, report)
    gm.graph.lint()
    gm.recompile()
    # the root's flag only: `gm.train()` would also reset the modes of the user's modules
    gm.training = model.training
    for module in (*stages(gm), *segments(gm)):
        module.training = model.training
    _copy_plain_attributes(model, gm)
    _check_same_parameters(model, gm)
    _preserve(gm, revwire_report=report, revwire_options=opts,
              revwire_input_shapes=_input_shapes(inputs))
    if given is not model:
        warnings.warn(f"rewire got torch.compile({type(model).__name__}) and rewired the module it compiles "
                      f"(its _orig_mod); the result runs eagerly: compile it with torch.compile(rewired)",
                      stacklevel=2)
    return gm


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
