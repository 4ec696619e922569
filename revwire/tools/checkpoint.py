"""Checkpoints: read timm-style weight files, save / load rewired models, export.

- `read_state_dict(path)` reads weights the way timm's `load_checkpoint` does: a
  `torch.save`d state_dict, or a dict holding one under `state_dict_ema` / `model_ema`
  (with `use_ema`), `state_dict` or `model`; `module.` / `_orig_mod.` prefixes (DDP,
  torch.compile) removed; `.safetensors` files. Always `weights_only=True`.
- `load_weights(model, path)` loads them strictly, with an error that lists missing,
  unexpected and mis-shaped keys when the file belongs to another architecture.
- `save(rev, path)` writes a revwire file: JSON-able metadata (spec, model arguments,
  example input shapes, rewire options, versions) and the state_dict, nothing else, so
  `torch.load(path, weights_only=True)` reads it; the keys are the original model's,
  so timm's `load_checkpoint(original, path)` also loads it (it picks `state_dict`).
- `load(path)` rebuilds the rewired model from such a file.
- `export_state_dict(src, out)` writes the plain state_dict of a revwire file (or of a
  model) that loads with `strict=True` into the original architecture.

Every file is written atomically: to a temporary file in the target directory, then
renamed over the target, so a failure never leaves a partial or overwritten output.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pickle
import signal
import tempfile
import threading
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from ..api import rewire
from ..errors import CheckpointError, InputError, OutputError, RewireError, SpecError
from ..options import ENGINES, STREAM_DTYPES, RewireOptions
from ..runtime.stage import set_engine, stages
from .specs import build_model, make_inputs, parse_spec, record_spec, spec_of

FORMAT = "revwire"
FORMAT_VERSION = 1
# `load` allocates the example inputs a file asks for: bound them (the largest is 512 MiB of float32)
MAX_INPUT_ELEMENTS = 2**27
MAX_INPUT_RANK = 8
PathLike = Union[str, "os.PathLike[str]"]

# how the legacy (pre-zip) torch.save format starts: its magic number, pickled
_TORCH_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # as timm's clean_state_dict


# --------------------------------------------------------------------------- writing


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_path(path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> str:
    """Fail early (before any expensive work) if `path` cannot be written.

    Refuses an existing path unless `overwrite`, a path that is one of `inputs` (an
    input is never overwritten), a directory, and a directory that does not exist or
    is not writable. Returns the path as a string.
    """
    path = os.fspath(path)
    if not path:
        raise OutputError("the output path is empty")
    for src in inputs:
        if src is not None and os.path.exists(path) and _same_file(path, src):
            raise OutputError(f"output {path} is the input file; write to another path")
    if os.path.isdir(path):
        raise OutputError(f"output {path} is a directory; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"output {path} exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise OutputError(f"cannot write {path}: directory {directory} {what}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {directory} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _sigterm_raises():
    """While in the block, SIGTERM (what `timeout` and job schedulers send) raises
    SystemExit(143), as SIGINT raises KeyboardInterrupt, so that `finally` clauses run
    before the process ends. Only where SIGTERM has its default action (a program's own
    handler is left alone) and in the main thread (the only one signals reach)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    raised = False

    def terminate(signum, frame):
        nonlocal raised
        if not raised:  # a second SIGTERM does not interrupt the cleanup of the first
            raised = True
            raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, terminate)
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def atomic_write(path: PathLike, write: Callable[[str], None], *, overwrite: bool = False) -> None:
    """Call `write(tmp_path)` to write a temporary file next to `path`, then rename it
    to `path`. On any failure, and on SIGINT or SIGTERM, the temporary file is removed
    and `path` is untouched. Without `overwrite`, an existing `path` is never replaced,
    even one created while writing."""
    path = check_output_path(path, overwrite=overwrite)
    with _sigterm_raises():
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            os.close(fd)
            try:
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_umask())
            except OSError as e:
                raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
            except RuntimeError as e:  # torch.save's zip writer reports a full disk this way
                raise OutputError(f"cannot write {path}: {_short(e)}") from None
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if path exists: never clobbers
                except FileExistsError:
                    raise OutputError(f"output {path} exists; pass --force to overwrite it") from None
                except OSError:  # no hard links on this file system
                    if os.path.lexists(path):
                        raise OutputError(f"output {path} exists; pass --force to overwrite it") from None
                    os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        try:  # make the rename durable
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: PathLike, *, overwrite: bool,
                  metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a plain state_dict: safetensors for a `.safetensors` path, else torch.save."""
    if os.fspath(path).lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses shared storage (tied weights): give each tensor its own.
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata), overwrite=overwrite)
    else:
        plain = {k: v for k, v in tensors.items()}
        atomic_write(path, lambda tmp: torch.save(plain, tmp), overwrite=overwrite)


# --------------------------------------------------------------------------- reading


def _is_safetensors(path: str) -> bool:
    if path.lower().endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[:2] == b"PK" or head[:1] == b"\x80":
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100_000_000


def check_input_file(path: PathLike, what: str = "checkpoint") -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path} not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path} is empty")
    return path


def _short(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_file(path: PathLike, what: str = "checkpoint") -> Any:
    """Read a `torch.save` file (with `weights_only=True`) or a `.safetensors` file."""
    path = check_input_file(path, what)
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{what} {path} is not a valid safetensors file (corrupt or truncated?): {_short(e)}") from None
    try:
        # timm training checkpoints often hold an argparse.Namespace under `args`.
        # torch.load's warnings are about its own reading (pickle protocol, sparse tensor
        # checks), nothing to act on: without them a bad file is one error line.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        _refuse_plain_pickle(path, what)
        unsafe = []
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            pass
        if unsafe or "unsupported global" in str(e).lower():
            names = f" ({', '.join(unsafe[:3])})" if unsafe else ""
            raise CheckpointError(
                f"{what} {path} holds Python objects{names} that are not loaded from files of unknown "
                f"origin; save its state_dict instead: torch.save(model.state_dict(), PATH)"
            ) from None
        cause = str(e).split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in str(e) else e
        raise CheckpointError(
            f"{what} {path} is not a readable PyTorch or safetensors file (corrupt or truncated?): {_short(cause)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            IndexError, TypeError, UnicodeDecodeError, MemoryError) as e:
        _refuse_plain_pickle(path, what)
        raise CheckpointError(
            f"{what} {path} is not a readable PyTorch or safetensors file (corrupt or truncated?): {_short(e)}"
        ) from None


def _refuse_plain_pickle(path: str, what: str) -> None:
    """A `pickle.dump` file (torch.save writes a zip archive, or, before torch 1.6, a pickle
    that starts with torch's magic number) is refused in one line, unread."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:1] == b"\x80" and _TORCH_MAGIC not in head:
        raise CheckpointError(
            f"{what} {path} is a plain pickle file (pickle.dump), not a torch.save or safetensors file; it "
            f"is not unpickled (that can run any code): if you trust it, unpickle it yourself and save its "
            f"state_dict with torch.save(state_dict, PATH)"
        )


def _strip_wrappers(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        if isinstance(k, str) and k.startswith(_WRAPPER_PREFIXES):
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix):]
        out[k] = v
    return out


def extract_state_dict(obj: Any, *, use_ema: bool = True, source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], str]:
    """The state_dict inside a loaded checkpoint object, timm's way; returns it with
    the key it was found under ('' for a bare state_dict)."""
    key = ""
    if isinstance(obj, Mapping):
        if use_ema and obj.get("state_dict_ema") is not None:
            key = "state_dict_ema"
        elif use_ema and obj.get("model_ema") is not None:
            key = "model_ema"
        elif "state_dict" in obj:
            key = "state_dict"
        elif "model" in obj:
            key = "model"
    else:
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    sd = obj[key] if key else obj
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: '{key}' holds a {type(sd).__name__}, not a state_dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not sd:
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise CheckpointError(
            f"{source} has no state_dict (top-level keys: {keys or 'none'}); expected a state_dict, "
            f"or a dict holding one under 'state_dict' or 'model'"
        )
    return _strip_wrappers(sd), key


def read_state_dict(path: PathLike, *, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read the state_dict of a checkpoint file (see module doc); returns (state_dict, key)."""
    return extract_state_dict(read_file(path), use_ema=use_ema, source=f"checkpoint {os.fspath(path)}")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _listing(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                     target: Optional[str] = None) -> None:
    """Raise `CheckpointError` unless `state_dict` loads strictly into `model`, listing a
    few missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    # BatchNorm adds `num_batches_tracked` itself to state_dicts saved without it.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shaped = [f"{k} ({_shape(state_dict[k])} in file, {_shape(own[k])} in model)"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shaped):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shaped:
        parts.append(f"mis-shaped: {_listing(shaped, 2)}")
    target = target or (spec_of(model) or {}).get("spec") or type(model).__name__
    raise CheckpointError(
        f"{source} does not match {target}: {'; '.join(parts)}. Is it a checkpoint of another "
        f"model, or were other model arguments (e.g. num_classes) used?"
    )


def load_weights(model: nn.Module, path: PathLike, *, use_ema: bool = True) -> str:
    """Load the weights of a checkpoint file into `model` strictly (timm's way, see
    `read_state_dict`; `.npz` files through the model's own `load_pretrained`).
    The model is not modified when the file does not fit. Returns where in the file
    the state_dict was found ('' for a bare state_dict)."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in (".npz", ".npy"):
        check_input_file(path)
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"checkpoint {path}: this model cannot load numpy checkpoints; convert it to a state_dict")
        try:
            model.load_pretrained(path)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} does not load into this model: {_short(e)}") from None
        return "npz"
    state_dict, key = read_state_dict(path, use_ema=use_ema)
    check_state_dict(model, state_dict, source=f"checkpoint {path}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not load: {_short(e, 300)}") from None
    return key


# --------------------------------------------------------------------------- revwire files


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _options_in(data: Mapping[str, Any], path: str) -> RewireOptions:
    try:
        return RewireOptions.from_dict(data["rewire_options"])
    except RewireError as e:
        raise _field_error(path, "rewire_options", f"is wrong: {e}") from None


def _input_shapes(rev: nn.Module) -> Optional[List[List[int]]]:
    """The shapes of the example inputs `rewire` propagated through `rev`, if recorded."""
    shapes = getattr(rev, "revwire_input_shapes", None)
    return [list(s) for s in shapes] if shapes else None


def _param_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return _dtype_name(p.dtype)
    return "float32"


def _engine_of(rev: nn.Module) -> Optional[str]:
    engines = {s.engine for s in stages(rev)}
    return engines.pop() if len(engines) == 1 else None


def revwire_record(rev: nn.Module, *, spec: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None,
                   input_shapes: Optional[Sequence[Sequence[int]]] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The dict that `save` writes (tensors moved to the CPU)."""
    if spec is None:
        record = spec_of(rev)
        if record is None:
            raise CheckpointError(
                "cannot tell how to rebuild this model: build it with revwire.build_model('timm:NAME') "
                "(or torchvision:NAME, module:package.module:factory) before rewiring, or pass "
                "spec=... to revwire.save; to keep only the weights use torch.save(model.state_dict(), PATH)"
            )
        spec, model_kwargs = record["spec"], record["model_kwargs"] if model_kwargs is None else model_kwargs
    options = getattr(rev, "revwire_options", None)
    if not isinstance(options, RewireOptions):
        raise CheckpointError("this model was not made by revwire.rewire (it has no revwire_options); rewire it first")
    shapes = [list(s) for s in input_shapes] if input_shapes else _input_shapes(rev)
    if not shapes:
        raise CheckpointError("cannot tell the example input shape this model was rewired with; pass input_shapes=[[B, C, H, W]]")
    state_dict = {k: v.detach().to("cpu") for k, v in rev.state_dict().items()}
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "revwire_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "spec": spec,
        "model_kwargs": dict(model_kwargs or {}),
        "input_shapes": shapes,
        "rewire_options": options.to_dict(),
        "engine": _engine_of(rev),
        "dtype": _param_dtype(rev),
    }
    if extra:
        out.update(extra)
    out["state_dict"] = state_dict
    return out


def save(rev: nn.Module, path: PathLike, *, overwrite: bool = True, spec: Optional[str] = None,
         model_kwargs: Optional[Mapping[str, Any]] = None,
         input_shapes: Optional[Sequence[Sequence[int]]] = None,
         extra: Optional[Mapping[str, Any]] = None) -> None:
    """Save a rewired model so that `revwire.load(path)` rebuilds it with its weights.

    The file holds the model spec and arguments, the example input shapes and rewire
    options, the revwire and torch versions, and the state_dict (whose keys are the
    original model's): only JSON-able values and tensors, so it loads with
    `torch.load(path, weights_only=True)`. The spec is the one `revwire.build_model`
    recorded, or `spec=` (with `model_kwargs=`). The write is atomic; with
    `overwrite=False` an existing file is refused (`OutputError`). The rewire options
    are the model's own `RewireOptions` (classes and functions stored as
    'package.module:Name').
    """
    record = revwire_record(rev, spec=spec, model_kwargs=model_kwargs, input_shapes=input_shapes,
                            extra=extra)
    atomic_write(path, lambda tmp: torch.save(record, tmp), overwrite=overwrite)


def _field_error(path: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"revwire file {path}: field '{field}' {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    return _short(repr(value), 80)


def _check_input_shapes(shapes: Any, path: str) -> None:
    """Each input is a shape (1 to `MAX_INPUT_RANK` positive ints), or a list / dict of
    shapes (a list input such as SlowFast's `[slow, fast]`); at most `MAX_INPUT_ELEMENTS`
    elements in all: `load` allocates these inputs."""
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise _field_error(path, "input_shapes", f"must be a non-empty list of shapes, got {_shown(shapes)}")
    total = 0

    def check(shape, field, nested):
        nonlocal total
        if isinstance(shape, (list, tuple)) and shape and not any(isinstance(n, (list, tuple, Mapping))
                                                                  for n in shape):
            if not (len(shape) <= MAX_INPUT_RANK and all(_is_int(n) and n >= 1 for n in shape)):
                raise _field_error(path, field, f"must be a list of 1 to {MAX_INPUT_RANK} positive "
                                                f"integers, got {_shown(shape)}")
            n = math.prod(shape)
            total += n
            if total > MAX_INPUT_ELEMENTS:
                before = f" ({total:,} with the inputs before it)" if total > n else ""
                raise _field_error(path, field, f"asks for {n:,} elements{before}; at most "
                                                f"{MAX_INPUT_ELEMENTS:,} in all are allowed (load allocates "
                                                f"them): the file is corrupt or was tampered with")
            return
        items = (shape.items() if isinstance(shape, Mapping) else enumerate(shape)
                 if isinstance(shape, (list, tuple)) and shape else None)
        if items is None or not nested:
            raise _field_error(path, field, f"must be a list of 1 to {MAX_INPUT_RANK} positive integers "
                                            f"(or a list of such for a list input), got {_shown(shape)}")
        for k, sub in items:
            check(sub, f"{field}[{k!r}]" if isinstance(k, str) else f"{field}[{k}]", nested=False)

    for i, shape in enumerate(shapes):
        check(shape, f"input_shapes[{i}]", nested=True)


def _check_rewire_options(options: Any, path: str) -> None:
    """Every value checked, nothing imported (the names of classes and functions are only
    checked to be strings: `load` imports them once the file is trusted)."""
    if not isinstance(options, Mapping):
        raise _field_error(path, "rewire_options", f"must be a dict, got a {type(options).__name__}")
    code = {f.name for f in dataclasses.fields(RewireOptions) if f.metadata["kind"] == "code"}
    for name, value in options.items():
        if not isinstance(name, str):
            raise _field_error(path, "rewire_options", f"has a key {_shown(name)}, not an option name")
        if name in code and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise _field_error(path, "rewire_options",
                               f"is wrong: rewire option {name} must be a list of 'package.module:Name', "
                               f"got {_shown(value)}")
    try:
        RewireOptions.from_dict({k: v for k, v in options.items() if k not in code})
    except RewireError as e:
        raise _field_error(path, "rewire_options", f"is wrong: {e}") from None


def _check_record(obj: Mapping[str, Any], path: str) -> None:
    """Type, range and size of every field `load` reads (`CheckpointError` naming it)."""
    for key in ("revwire_version", "torch_version"):
        if key in obj and not isinstance(obj[key], str):
            raise _field_error(path, key, f"must be a string, got {_shown(obj[key])}")
    version = obj["format_version"]
    if not _is_int(version) or version < 1:
        raise _field_error(path, "format_version",
                           f"must be an integer from 1 to {FORMAT_VERSION}, got {_shown(version)}")
    if version > FORMAT_VERSION:
        raise _field_error(path, "format_version",
                           f"is {version}: the file was written by revwire {obj.get('revwire_version')} in a "
                           f"newer format; upgrade revwire (this is revwire {__version__}, format "
                           f"{FORMAT_VERSION})")
    for key in ("spec", "state_dict", "rewire_options", "input_shapes"):
        if key not in obj:
            raise CheckpointError(f"revwire file {path} is incomplete: it has no '{key}'")
    try:
        parse_spec(obj["spec"])
    except SpecError as e:
        raise _field_error(path, "spec", f"is wrong: {e}") from None
    kwargs = obj.get("model_kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise _field_error(path, "model_kwargs", f"must be a dict of constructor arguments, got a {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise _field_error(path, "model_kwargs", f"must be a dict of constructor arguments, got a key {_shown(bad[0])}")
    _check_input_shapes(obj["input_shapes"], path)
    _check_rewire_options(obj["rewire_options"], path)
    if obj.get("engine") not in (None, *ENGINES):
        raise _field_error(path, "engine", f"must be one of {ENGINES} or None, got {_shown(obj['engine'])}")
    if obj.get("dtype") not in (None, *STREAM_DTYPES):  # the floating dtypes revwire handles
        raise _field_error(path, "dtype", f"must be one of {STREAM_DTYPES}, got {_shown(obj['dtype'])}")
    state_dict = obj["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise _field_error(path, "state_dict", f"must be a dict of tensors, got a {type(state_dict).__name__}")
    if not state_dict:
        raise _field_error(path, "state_dict", "is empty")
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _field_error(path, "state_dict", f"must be a dict of tensors, got {_shown(k)}: {type(v).__name__}")
        if v.layout != torch.strided or v.is_complex():
            raise _field_error(path, "state_dict", f"holds {_shown(k)}, a {v.layout} {v.dtype} tensor: only dense "
                                                   f"real tensors load into a model")


def read_revwire_file(path: PathLike) -> Dict[str, Any]:
    """Read a file written by `save` / `revwire convert`, and check every field `load`
    reads (`CheckpointError` naming the file and the field)."""
    path = os.fspath(path)
    obj = read_file(path, what="revwire file")
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a revwire file (written by `revwire convert` or revwire.save); "
            f"to convert a plain checkpoint use: revwire convert SPEC --checkpoint {path} -o OUT"
        )
    if "format_version" not in obj:
        raise CheckpointError(f"revwire file {path} is incomplete: it has no 'format_version'")
    _check_record(obj, path)
    return dict(obj)


_TRUSTED_ROOTS = ("torch", "torchvision", "timm", "revwire")


def _code_named(data: Mapping[str, Any]) -> List[str]:
    """What loading `data` would import and call beyond timm / torchvision / torch."""
    named = [data["spec"]] if parse_spec(data["spec"])[0] == "module" else []
    for key in ("leaf_modules", "autowrap_functions"):
        for v in (data.get("rewire_options") or {}).get(key) or ():
            if isinstance(v, str) and v.split(":")[0].split(".")[0] not in _TRUSTED_ROOTS:
                named.append(v)
    return named


def load(path: PathLike, *, device: Optional[Union[str, torch.device]] = None, trust_code: bool = False) -> nn.Module:
    """Rebuild a rewired model, with its weights, from a file written by `revwire.save`
    or `revwire convert`. The model is built from its spec, rewired with the stored
    options on a random input of the stored shape, and its state_dict loaded strictly.
    Returns it in train mode, on the CPU unless `device` is given.

    The file itself is read with `weights_only=True`. A `module:package.module:factory`
    spec (or a leaf module / autowrapped function outside torch, torchvision and timm)
    means importing and calling code the file names: that needs `trust_code=True`,
    given only for files you trust (your own)."""
    path = os.fspath(path)
    data = read_revwire_file(path)
    named = _code_named(data)
    if named and not trust_code:
        raise CheckpointError(
            f"revwire file {path} names code to import and call ({', '.join(named[:3])}); if you trust "
            f"this file, load it with revwire.load(path, trust_code=True)"
        )
    kwargs = data.get("model_kwargs", {})
    try:
        model = build_model(data["spec"], kwargs)
    except SpecError as e:
        raise CheckpointError(f"revwire file {path}: fields 'spec' and 'model_kwargs' do not build a model: {e}") from None
    dtype = getattr(torch, data.get("dtype") or "float32")
    if dtype != torch.float32:
        model = model.to(dtype)
    gen_inputs = make_inputs(data["input_shapes"], seed=0, dtype=dtype)
    example = gen_inputs  # a tuple of the positional inputs (one may be a list: [slow, fast])
    state_dict = data["state_dict"]
    check_state_dict(model, state_dict, source=f"revwire file {path}", target=data["spec"])
    options = _options_in(data, path)
    try:
        rev = rewire(model, example, options)
    except InputError as e:
        raise _field_error(path, "input_shapes", f"{_shown(data['input_shapes'])}: the model does not accept "
                                                 f"inputs of these shapes: {e}") from None
    except RewireError as e:
        raise _field_error(path, "rewire_options", f"does not rewire its model: {e}") from None
    rev.load_state_dict(state_dict, strict=True)  # after rewiring: buffers exactly as saved
    if data.get("engine"):
        set_engine(rev, data["engine"])
    record_spec(rev, data["spec"], kwargs)
    rev.__dict__["revwire_input_shapes"] = [list(s) for s in data["input_shapes"]]
    if device is not None:
        rev = rev.to(device)
    return rev


def export_state_dict(src: Union[PathLike, nn.Module], out: PathLike, *, overwrite: bool = False) -> int:
    """Write the plain state_dict of a revwire file (or of a model, rewired or not) to
    `out`: it loads with `strict=True` into the original architecture. A `.safetensors`
    `out` is written as safetensors, anything else with `torch.save`. Returns the
    number of tensors written."""
    if isinstance(src, nn.Module):
        state_dict = {k: v.detach().to("cpu") for k, v in src.state_dict().items()}
        check_output_path(out, overwrite=overwrite)
    else:
        check_output_path(out, overwrite=overwrite, inputs=[src])
        state_dict = read_revwire_file(src)["state_dict"]
    _save_tensors(state_dict, out, overwrite=overwrite)
    return len(state_dict)
