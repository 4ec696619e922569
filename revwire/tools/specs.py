"""Model specs: `timm:NAME`, `torchvision:NAME`, `transformers:ClassName` (or
`transformers:/local/dir`), `pytorchvideo:NAME`, `module:package.module:factory`.

A spec names a model architecture. `build_model` turns it (plus constructor keyword
arguments) into an `nn.Module` with random weights, records the spec on the module
(`module.revwire_spec`, a JSON-able dict) so that `revwire.save` knows how to rebuild
it, and `default_input` makes a random input of the model's own size (timm
`pretrained_cfg`, torchvision weights metadata), overridable by the caller.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InputError, SpecError
from ..options import did_you_mean, resolve_name

KINDS = ("timm", "torchvision", "transformers", "pytorchvideo", "module")
_SPEC_FORMS = ("timm:NAME, torchvision:NAME, transformers:ClassName (or transformers:/local/dir), "
               "pytorchvideo:NAME or module:package.module:factory")
SPEC_ATTR = "revwire_spec"



# --------------------------------------------------------------------------- parsing


def parse_spec(spec: str) -> Tuple[str, str]:
    """Split a spec into (kind, name); raise SpecError on a malformed one."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"invalid model spec {spec!r}: write {_SPEC_FORMS}")
    kind, name = spec.split(":", 1)
    kind = kind.strip().lower()
    name = name.strip()
    if kind not in KINDS:
        raise SpecError(f"invalid model spec {spec!r}: unknown kind {kind!r}; write {_SPEC_FORMS}")
    if not name:
        raise SpecError(f"invalid model spec {spec!r}: the model name is empty")
    if kind == "module":
        mod, _, attr = name.partition(":")
        if not mod or not attr:
            raise SpecError(
                f"invalid model spec {spec!r}: write module:package.module:factory "
                f"(a callable that returns the nn.Module)"
            )
    return kind, name


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word: a string


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """Parse `["num_classes=7", "drop_path_rate=0.1", "act_layer=gelu"]` into a dict.

    Values are Python literals (numbers, booleans, tuples, quoted strings; `true`,
    `false`, `none` also work); anything else is taken as a string.
    """
    kwargs: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"invalid model argument {item!r}: write NAME=VALUE, e.g. num_classes=7")
        kwargs[key] = _parse_value(value)
    _check_jsonable(kwargs, "model arguments")
    return kwargs


def _check_jsonable(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{what} must be JSON-able (numbers, strings, booleans, lists): {e}") from None


def parse_input_size(text: str) -> Tuple[int, ...]:
    """Parse `C,H,W` or `C,T,H,W` (also `3x224x224`) into a tuple of positive ints."""
    compact = re.sub(r"\s+", "", str(text))
    size = tuple(int(p) for p in re.split(r"[,x]", compact)) if re.fullmatch(r"\d+([,x]\d+)*", compact) else ()
    if not size or any(s <= 0 for s in size):
        raise InputError(f"invalid input size {text!r}: write C,H,W or C,T,H,W, e.g. 3,224,224")
    return size


# --------------------------------------------------------------------------- building


def _timm_model(name: str, kwargs: Dict[str, Any], pretrained: bool) -> nn.Module:
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise SpecError(f"unknown timm model {name!r}{did_you_mean(arch, timm.list_models())}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _torchvision_names() -> Tuple[Sequence[str], Sequence[str]]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm), tvm.list_models(module=tvm.video)


def _torchvision_model(name: str, kwargs: Dict[str, Any], pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    classification, video = _torchvision_names()
    if name not in classification and name not in video:
        if name in tvm.list_models():
            raise SpecError(
                f"torchvision:{name} is not a classification or video model; wrap it in a "
                f"factory of your own and use module:package.module:factory"
            )
        raise SpecError(
            f"unknown torchvision model {name!r}{did_you_mean(name, list(classification) + list(video))}"
        )
    if pretrained:
        kwargs = dict(kwargs, weights="DEFAULT")
    return tvm.get_model(name, **kwargs)


def _module_model(name: str, kwargs: Dict[str, Any], pretrained: bool) -> nn.Module:
    if pretrained:
        raise SpecError(
            f"--pretrained works for timm: and torchvision: specs only; load the weights of "
            f"module:{name} with --checkpoint PATH"
        )
    factory = resolve_name(name)
    if not callable(factory):
        raise SpecError(f"module:{name} is not callable: it must be a function or class returning an nn.Module")
    return factory(**kwargs)


def _import_extra(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise SpecError(f"{name} is not installed ({e}); install it with pip install 'revwire[{extra}]'") from None


def _is_local_dir(name: str) -> bool:
    import os
    return name.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(name))


def _transformers_model(name: str, kwargs: Dict[str, Any], pretrained: bool) -> nn.Module:
    """`transformers:VideoMAEModel`: the class built from its config class, `kwargs` setting
    config fields, random weights; `transformers:/local/dir`: a saved checkpoint
    (`save_pretrained`), loaded with `from_pretrained` from that directory only."""
    import os

    transformers = _import_extra("transformers", "hf")
    if _is_local_dir(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise SpecError(f"transformers:{name}: no such directory (write transformers:ClassName "
                            f"or transformers:/dir/with/config.json)")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
        return cls.from_pretrained(path, config=config, local_files_only=True)
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "config_class", None)):
        names = [n for n in dir(transformers) if n.endswith(("Model", "ForImageClassification",
                                                             "ForVideoClassification", "ForCausalLM"))]
        raise SpecError(f"unknown transformers model class {name!r}{did_you_mean(name, names)}")
    if pretrained:
        raise SpecError(f"transformers:{name} has no pretrained weights of its own: save a checkpoint "
                        f"with save_pretrained and use transformers:/that/dir, or --checkpoint PATH")
    config_cls = cls.config_class
    try:
        known = set(config_cls().to_dict())
    except Exception:  # a config that needs arguments: let it check them itself
        known = None
    unknown = sorted(set(kwargs) - known) if known is not None else []
    if unknown:  # transformers configs keep unknown keywords silently: a typo would be ignored
        raise SpecError(f"{config_cls.__name__} has no field {unknown[0]!r}"
                        f"{did_you_mean(unknown[0], sorted(known))} (--model-kwargs set config fields)")
    try:
        config = config_cls(**kwargs)
    except Exception as e:
        raise SpecError(f"cannot make {config_cls.__name__} with {kwargs}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return cls(config)


def _pytorchvideo_names() -> Sequence[str]:
    _import_extra("pytorchvideo", "video")
    import pytorchvideo.models.hub as hub

    return sorted(n for n in dir(hub) if not n.startswith("_") and callable(getattr(hub, n))
                  and not isinstance(getattr(hub, n), type) and n not in ("utils",))


def _pytorchvideo_model(name: str, kwargs: Dict[str, Any], pretrained: bool) -> nn.Module:
    names = _pytorchvideo_names()
    if name not in names:
        raise SpecError(f"unknown pytorchvideo model {name!r}{did_you_mean(name, names)}")
    import pytorchvideo.models.hub as hub

    return getattr(hub, name)(pretrained=pretrained, **kwargs)


_BUILDERS = {"timm": _timm_model, "torchvision": _torchvision_model, "transformers": _transformers_model,
             "pytorchvideo": _pytorchvideo_model, "module": _module_model}


def build_model(spec: str, model_kwargs: Optional[Mapping[str, Any]] = None, *, pretrained: bool = False) -> nn.Module:
    """Build the model that `spec` names, with random weights (or the library's
    pretrained weights with `pretrained=True`, which needs network access or a cache).

    Records `{"spec": spec, "model_kwargs": {...}}` on the returned module as
    `module.revwire_spec`. Raises `SpecError` for an unknown name or bad arguments.
    """
    kind, name = parse_spec(spec)
    kwargs = dict(model_kwargs or {})
    _check_jsonable(kwargs, "model arguments")
    try:
        model = _BUILDERS[kind](name, kwargs, pretrained)
    except SpecError:
        raise
    except TypeError as e:
        raise SpecError(f"cannot build {spec} with arguments {kwargs}: {e}") from None
    except Exception as e:
        if pretrained:
            raise  # the caller turns download errors into a CheckpointError
        raise SpecError(f"building {spec} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec} returned an object of type {type(model).__name__}, not an nn.Module")
    record_spec(model, f"{kind}:{name}", kwargs)
    return model


def record_spec(model: nn.Module, spec: str, model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Attach a spec record to `model` (`rewire` carries it to the rewired model)."""
    parse_spec(spec)
    kwargs = dict(model_kwargs or {})
    _check_jsonable(kwargs, "model arguments")
    record = {"spec": spec, "model_kwargs": kwargs}
    model.__dict__[SPEC_ATTR] = record  # a plain attribute, not a submodule or buffer
    return record


def spec_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The spec record `build_model` attached to `model` (or `rewire` carried over to its
    rewired twin); None when unknown."""
    record = getattr(model, SPEC_ATTR, None)
    return record if isinstance(record, dict) else None


# --------------------------------------------------------------------------- inputs


def _torchvision_input_size(name: str) -> Tuple[int, ...]:
    import torchvision.models as tvm

    _, video = _torchvision_names()
    crop, frames = 224, 16
    try:
        weights = list(tvm.get_model_weights(name))
    except Exception:
        weights = []
    if weights:
        w = weights[0]
        c = getattr(w.transforms, "keywords", {}).get("crop_size")
        if isinstance(c, (tuple, list)):
            c = c[0]
        if isinstance(c, int):
            crop = c
        frames = max(frames, int(w.meta.get("min_temporal_size", 0) or 0))
    return (3, frames, crop, crop) if name in video else (3, crop, crop)


def default_input_size(model: nn.Module, spec: Optional[str] = None,
                       model_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[int, ...]:
    """The per-sample input size the model expects (without the batch dimension).

    timm models: `pretrained_cfg["input_size"]`, adjusted for `img_size` / `in_chans`
    model arguments; torchvision: the crop size of its weights (and 16 frames for video
    models); other models: a `pretrained_cfg` or `default_cfg` they carry. Raises
    `InputError` when none is known.
    """
    kwargs = dict(model_kwargs or {})
    kind, name = parse_spec(spec) if spec else (None, None)
    if kind == "torchvision":
        size = list(_torchvision_input_size(name))
    elif kind == "transformers":
        return _transformers_input_size(model, spec)
    elif kind == "pytorchvideo":
        return _pytorchvideo_input_size(name, kwargs)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        size = list(cfg["input_size"]) if isinstance(cfg, Mapping) and cfg.get("input_size") else None
        if size is None:
            raise InputError(
                f"the input size of {spec or type(model).__name__} is not known: pass --input-size "
                f"C,H,W (or C,T,H,W for video)"
            )
    img = kwargs.get("img_size", kwargs.get("image_size"))
    if isinstance(img, int):
        size[-2:] = [img, img]
    elif isinstance(img, (tuple, list)) and len(img) == 2:
        size[-2:] = list(img)
    chans = kwargs.get("in_chans", kwargs.get("in_channels"))
    if isinstance(chans, int):
        size[0] = chans
    return tuple(int(s) for s in size)


def _transformers_input_size(model: nn.Module, spec: str) -> Tuple[int, ...]:
    """(C, H, W) of a vision model's `pixel_values`; (T, C, H, W) for a video model (VideoMAE,
    ViViT, TimeSformer take frames before channels), from its config."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    if size is None:
        raise InputError(f"the input size of {spec} is not known (its config has no image_size): "
                         f"pass --input-size C,H,W (or T,C,H,W for video); text models take token ids, "
                         f"which the CLI does not make: use revwire.rewire(model, (input_ids,))")
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    c = int(getattr(config, "num_channels", 3))
    frames = getattr(config, "num_frames", None)
    return (int(frames), c, int(h), int(w)) if frames else (c, int(h), int(w))


_PYTORCHVIDEO_SIZES = {  # (frames, crop) of the hub's models, as their model cards give them
    "slow_r50": (8, 224), "slow_r50_detection": (4, 224), "c2d_r50": (8, 224), "i3d_r50": (8, 224),
    "r2plus1d_r50": (16, 224), "csn_r101": (32, 224), "x3d_xs": (4, 160), "x3d_s": (13, 160),
    "x3d_m": (16, 224), "x3d_l": (16, 312), "mvit_base_16": (1, 224), "mvit_base_16x4": (16, 224),
    "mvit_base_32x3": (32, 224), "efficient_x3d_xs": (4, 160), "efficient_x3d_s": (13, 160),
    "slowfast_r50": (32, 224), "slowfast_r101": (32, 224), "slowfast_16x8_r101_50_50": (64, 224),
    "slowfast_r50_detection": (32, 224),
}


def _pytorchvideo_input_size(name: str, kwargs: Mapping[str, Any]) -> Tuple[int, ...]:
    frames, crop = _PYTORCHVIDEO_SIZES.get(name, (8, 224))
    frames = int(kwargs.get("input_clip_length", kwargs.get("temporal_size", frames)))
    crop = int(kwargs.get("input_crop_size", kwargs.get("spatial_size", crop)))
    return (3, frames, crop, crop)


def is_two_pathway(spec: Optional[str]) -> bool:
    """A SlowFast model: its forward takes one list `[slow, fast]`."""
    if not spec:
        return False
    kind, name = parse_spec(spec)
    return kind == "pytorchvideo" and name.startswith("slowfast")


def fit_input_size(spec: str, model_kwargs: Optional[Mapping[str, Any]],
                   input_size: Optional[Sequence[int]]) -> Tuple[Dict[str, Any], Optional[str]]:
    """Model arguments that let `spec` take inputs of `input_size`.

    timm models with a fixed input size (ViT, DeiT, Swin: position embeddings sized at
    construction) get `img_size=H` (or `[H, W]`) when `input_size` asks for another
    height and width and no `img_size` was given. Returns (kwargs, a note or None).
    """
    kwargs = dict(model_kwargs or {})
    if not spec or not input_size or len(input_size) < 2 or "img_size" in kwargs:
        return kwargs, None
    kind, name = parse_spec(spec)
    if kind != "timm":
        return kwargs, None
    try:
        from timm.models import get_pretrained_cfg, split_model_name_tag

        cfg = get_pretrained_cfg(split_model_name_tag(name)[0])
    except Exception:
        return kwargs, None
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or not getattr(cfg, "input_size", None):
        return kwargs, None
    h, w = (int(v) for v in input_size[-2:])
    if (h, w) == tuple(cfg.input_size[-2:]):
        return kwargs, None
    kwargs["img_size"] = h if h == w else [h, w]
    return kwargs, f"{spec} has a fixed input size: built with img_size={kwargs['img_size']} for --input-size"


def make_input(size: Sequence[int], batch: int = 1, *, seed: Optional[int] = 0,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A random batch of shape (batch, *size), from its own generator (the global RNG
    is left alone)."""
    if batch <= 0:
        raise InputError(f"invalid batch size {batch}: it must be at least 1")
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    x = torch.randn((batch, *size), generator=gen, dtype=torch.float32).to(dtype)
    return x.to(device) if device is not None else x


def default_input(model: nn.Module, spec: Optional[str] = None, *, input_size: Optional[Sequence[int]] = None,
                  batch: int = 1, model_kwargs: Optional[Mapping[str, Any]] = None, seed: Optional[int] = 0,
                  device=None, structured: bool = False) -> torch.Tensor:
    """A random input batch for `model`: `input_size` if given, else the model's own.

    A SlowFast model takes one list `[slow, fast]` (the slow pathway every alpha-th frame
    of the fast one): with `structured=True` (as the CLI asks) that list is returned;
    otherwise an InputError says how to get it (a caller expecting one tensor)."""
    if spec is None:
        record = spec_of(model)
        if record is not None:
            spec, model_kwargs = record["spec"], model_kwargs or record["model_kwargs"]
    size = tuple(input_size) if input_size else default_input_size(model, spec, model_kwargs)
    x = make_input(size, batch, seed=seed, device=device)
    if is_two_pathway(spec):  # [slow, fast]: the slow pathway sees every alpha-th frame
        if not structured:
            raise InputError(
                f"{spec} takes one list [slow, fast] as its input, not one tensor: "
                f"default_input(model, '{spec}', structured=True) makes that list; rewire it with "
                f"revwire.rewire(model, ([slow, fast],))")
        stride = (model_kwargs or {}).get("slowfast_fusion_conv_stride") or (4,)
        alpha = int(stride[0])
        return [x[:, :, ::alpha].contiguous(), x]
    return x


def make_inputs(shapes: Sequence[Any], *, seed: Optional[int] = 0, dtype: torch.dtype = torch.float32,
                device=None) -> tuple:
    """Random example inputs of the shapes `rewire` recorded (`revwire_input_shapes`): one
    `[B, ...]` per positional input, or a list of such for a list input (`[slow, fast]`)."""
    def build(shape):
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
            return make_input(shape[1:], shape[0], seed=seed, dtype=dtype, device=device)
        if isinstance(shape, Mapping):
            return {k: build(v) for k, v in shape.items()}
        if isinstance(shape, (list, tuple)) and shape:
            return [build(v) for v in shape]
        raise InputError(f"invalid recorded input shape {shape!r}")
    return tuple(build(s) for s in shapes)
