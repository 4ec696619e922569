"""`RewireOptions`: every option of `revwire.rewire`, in one frozen record.

`rewire`, revwire files (`save` / `load`) and the CLI all read this one record: adding an
option is one field here (with its `doc` and, if the CLI has it, its `flag`) and a test.
Files store `RewireOptions.to_dict()` (JSON: dtypes by name, classes and functions as
'package.module:Name'); `from_dict` reads that back and is also what the CLI's flags go
through, so there is one decoder for every outside representation.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .errors import OptionError, SpecError

ENGINES = ("reversible", "autograd")
POST_ACTIVATIONS = ("branch", "skip")
CAPTURES = ("auto", "symbolic", "concrete")
STREAM_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _option(default, doc: str, kind: str, *, flag: Optional[str] = None, choices: Tuple[str, ...] = ()):
    """A field of `RewireOptions`. `kind` says how it is written to a file (and read from
    a file or a CLI string): "int", "bool", "choice", "dtype" or "code" (a tuple of classes
    or functions, stored as 'package.module:Name'). `flag`: its CLI flag, if it has one."""
    return field(default=default, metadata={"doc": doc, "kind": kind, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class RewireOptions:
    """How `revwire.rewire` converts a model (defaults are the compiler's)."""

    min_blocks: int = _option(2, "shortest chain of residual blocks to rewire", "int", flag="--min-blocks")
    post_activation: str = _option(
        "branch", "act(x + F(x)): move act into the branch, or skip the block", "choice",
        flag="--post-activation", choices=POST_ACTIVATIONS)
    leaf_modules: Tuple[type, ...] = _option(
        (), "module classes traced as leaves (not traced into)", "code", flag="--leaf-module")
    not_leaf: Tuple[type, ...] = _option(
        (), "module classes traced into even though the leaf rule (a forward that reads "
            "self.training, timm's no-trace list) would keep them whole", "code", flag="--not-leaf")
    autowrap_functions: Tuple[Callable, ...] = _option(
        (), "functions not traced into (called as they are)", "code", flag="--autowrap")
    capture: str = _option(
        "auto", "front end: 'symbolic' (torch.fx), 'concrete' (Python control flow on shapes and "
                "dtypes read from the example inputs), 'auto' (symbolic, else concrete)", "choice",
        flag="--capture", choices=CAPTURES)
    strict: bool = _option(True, "raise NoChainError when nothing can be rewired (else warn, "
                                 "return the model)", "bool")
    stream_dtype: Optional[torch.dtype] = _option(
        None, "keep the reversible streams in this dtype (None: float64 under autocast or for a "
              "half-precision input, where it makes the inversion exact; else the input's)", "dtype",
        flag="--stream-dtype", choices=STREAM_DTYPES)
    engine: str = _option("reversible", "the stages' engine: 'reversible' recomputes, 'autograd' "
                                        "stores (the ground truth)", "choice", choices=ENGINES)
    check_finite: bool = _option(True, "raise ReconstructionError when backward reconstructs a "
                                       "non-finite value", "bool")
    checkpoint_rest: bool = _option(
        False, "recompute in backward the parts left out of reversible stages (stems, projection "
               "blocks, short chains) instead of storing their activations", "bool", flag="--checkpoint-rest")
    sdpa_attention: bool = _option(
        False, "compute explicit attention (torchvision swin3d's window attention) through "
               "F.scaled_dot_product_attention, which does not store the attention matrix", "bool",
        flag="--sdpa-attention")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] == "code":
                value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
                object.__setattr__(self, f.name, value)
            _check(f, value)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, options: Optional["RewireOptions"] = None, **changes: Any) -> "RewireOptions":
        """`options` (default: the defaults) with `changes`; an unknown name is an InputError."""
        unknown = sorted(set(changes) - set(cls.field_names()))
        if unknown:
            raise OptionError(f"unknown rewire option(s) {unknown}; the options are {list(cls.field_names())}")
        return dataclasses.replace(options or cls(), **changes)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able: what revwire files store."""
        out = {}
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if kind == "dtype":
                value = None if value is None else str(value).replace("torch.", "")
            elif kind == "code":
                value = [qualified_name(v) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewireOptions":
        """Read `to_dict()`'s form back (missing fields take their defaults). Unknown fields
        and values of the wrong type are an `InputError` naming the field; the names of
        classes and functions are imported."""
        if not isinstance(data, Mapping):
            raise OptionError(f"rewire options must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise OptionError(f"unknown rewire option(s) {unknown}; the options are {list(cls.field_names())}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{name: _decode(fields[name], value) for name, value in data.items()})


def _check(f: dataclasses.Field, value: Any) -> None:
    kind, name = f.metadata["kind"], f.name
    if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise OptionError(f"rewire option {name} must be an integer >= 1, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise OptionError(f"rewire option {name} must be True or False, got {value!r}")
    if kind == "choice" and value not in f.metadata["choices"]:
        raise OptionError(f"rewire option {name} must be one of {f.metadata['choices']}, got {value!r}")
    if kind == "dtype" and value is not None and not (
            isinstance(value, torch.dtype) and value.is_floating_point):
        raise OptionError(f"rewire option {name} must be a floating torch.dtype or None, got {value!r}")
    if kind == "code" and not all(callable(v) for v in value):
        raise OptionError(f"rewire option {name} must hold classes or functions, got {value!r}")


def _decode(f: dataclasses.Field, value: Any) -> Any:
    kind = f.metadata["kind"]
    if kind == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise OptionError(f"rewire option {f.name}: unknown dtype {value!r}")
        return dtype
    if kind == "code":
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"rewire option {f.name} must be a list of 'package.module:Name', got {value!r}")
        return tuple(resolve_name(v) if isinstance(v, str) else v for v in value)
    return value


def qualified_name(obj: Any) -> str:
    """'package.module:Qual.Name' of a class or function (as `resolve_name` reads it)."""
    return f"{obj.__module__}:{obj.__qualname__}"


def resolve_name(path: str) -> Any:
    """Import `package.module:attr.attr` and return the attribute (SpecError if it fails).

    The current directory is importable during the import, as with `python -m`.
    """
    if not isinstance(path, str) or ":" not in path:
        raise SpecError(f"{path!r}: write package.module:Name")
    mod_name, _, attr = path.partition(":")
    added = False
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
        added = True
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {mod_name!r}: {e}") from None
    except Exception as e:  # an error inside the user's module
        raise SpecError(f"importing module {mod_name!r} failed: {type(e).__name__}: {e}") from None
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise SpecError(f"module {mod_name!r} has no attribute {attr!r}{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


def did_you_mean(name: str, names: Sequence[str], n: int = 3) -> str:
    """'; did you mean a, b?' for the names closest to `name` ('' when none is close)."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:
        low = name.lower()
        close = [m for m in names if low in m][:n]
    return f"; did you mean {', '.join(close)}?" if close else ""
