"""The `revwire` command: `inspect`, `convert` and `export` (a thin shell over the API).

    revwire inspect timm:resnet50 --input-size 3,160,160
    revwire convert timm:vit_base_patch16_224 --checkpoint w.safetensors -o rev.pt --verify
    revwire export rev.pt -o plain.pth

Bad input (unknown model, unreadable or mismatched checkpoint, existing or unwritable
output, untraceable model, no residual chain) gives one line `revwire: error: ...` on
stderr and exit status 2; nothing is written and no input is modified.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence

import torch

from .. import __version__
from ..api import report, rewire
from ..errors import CheckpointError, InputError, RewireError, SpecError
from ..options import RewireOptions
from ..runtime.meter import train_step_peak
from ..runtime.verify import restore_buffers, snapshot_buffers, verify
from .checkpoint import check_input_file, check_output_path, export_state_dict, load_weights, save
from .twins import checkpoint_twin
from .specs import (build_model, default_input, fit_input_size, parse_input_size, parse_model_kwargs,
                    parse_spec)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- helpers


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _mib(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


class _Output:
    """Where results go: text (unless --quiet) or one JSON document."""

    def __init__(self, args: argparse.Namespace):
        self.quiet = getattr(args, "quiet", False)
        self.json = getattr(args, "json", False)

    def say(self, *lines: str) -> None:
        if not (self.quiet or self.json):
            for line in lines:
                print(line)

    def emit(self, data: Dict[str, Any], summary: Optional[str] = None) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str))
        elif self.quiet and summary:
            print(summary)


def _rewire_options(args: argparse.Namespace) -> RewireOptions:
    """The options the user set, read as a revwire file's options are (one decoder)."""
    given = {}
    for f in dataclasses.fields(RewireOptions):
        value = getattr(args, f.name, None)
        if f.metadata["flag"] and value is not None:
            given[f.name] = value
    return RewireOptions.from_dict(given)


def _build(args: argparse.Namespace, *, pretrained: bool = False):
    """The model (random weights, or pretrained) and its example input."""
    kwargs, note = fit_input_size(args.spec, parse_model_kwargs(args.model_kwargs), args.input_size)
    if note and not (args.quiet or args.json):
        print(f"note: {note}")
    if pretrained:
        model = _build_pretrained(args.spec, kwargs)
    else:
        model = build_model(args.spec, kwargs)
    x = default_input(model, args.spec, input_size=args.input_size, batch=args.batch,
                      model_kwargs=kwargs, seed=args.seed, structured=True)
    return model, kwargs, x


def _example(x):
    """`x` as `rewire` and the meter take it: a list input (`[slow, fast]`) is one argument."""
    return (x,) if isinstance(x, list) else x


def _shape_of(x):
    """[B, C, ...] of the input, or a list of such for a list input."""
    return [list(t.shape) for t in x] if isinstance(x, list) else list(x.shape)


def _shape_text(shape) -> str:
    if shape and isinstance(shape[0], list):
        return "[" + ", ".join(_shape_text(s) for s in shape) + "]"
    return "x".join(map(str, shape))


def _build_pretrained(spec: str, kwargs: Dict[str, Any]):
    kind, _ = parse_spec(spec)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry messages would drown the error line
    try:
        return build_model(spec, kwargs, pretrained=True)
    except SpecError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"could not get the pretrained weights of {spec} ({type(e).__name__}: {_one_line(e)[:200]}); "
            f"this needs network access (or the weights in the {kind} cache): download them elsewhere "
            f"and pass --checkpoint PATH"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _chain_summary(rep_dict: Dict[str, Any]) -> str:
    chains = rep_dict.get("chains", [])
    blocks = sum(int(c.get("num_blocks", len(c.get("blocks", [])))) for c in chains)
    return f"{len(chains)} chain{'s' * (len(chains) != 1)}, {blocks} blocks"


def _forward_guard(what: str, x: torch.Tensor):
    """Turn a model's failure on the example input into an InputError."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            if et is not None and issubclass(et, InputError) and "--input-size" not in str(e):
                raise InputError(f"{_one_line(e)} (set the input with --input-size / --batch / --model-kwargs)") from None
            if et is not None and issubclass(et, (RuntimeError, ValueError, AssertionError, IndexError)) \
                    and not issubclass(et, RewireError):
                shape = _shape_text(_shape_of(x))
                raise InputError(
                    f"{what} failed on a {shape} input ({et.__name__}: {_one_line(e)[:200]}); "
                    f"check --input-size / --batch / --model-kwargs"
                ) from None
            return False

    return _Guard()


def _verify_line(v: Dict[str, Any]) -> str:
    shape = _shape_text(v["input_shape"])
    status = "ok" if v["ok"] else "FAILED"
    return (f"verify: reversible vs autograd on a random {shape} batch: {status} "
            f"(output {v['output_rel_error']:.1e}, input grad {v['input_grad_rel_error']:.1e}, "
            f"max param grad {v['param_grad_max_rel_error']:.1e} at {v['worst_param']}; "
            f"relative errors, tolerance {v['tolerance']:.0e})")


# --------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    out = _Output(args)
    opts = _rewire_options(args)
    model, kwargs, x = _build(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; measure on the CPU (the default)")
    shape = _shape_text(_shape_of(x))
    with _forward_guard(f"rewiring {args.spec}", x):
        rev = rewire(model, _example(x), opts)
    rep = report(rev)
    rep_dict = rep.to_dict()
    if args.device == "cuda":
        model.cuda()
        rev.cuda()  # shares the parameters; moves its own constants, if any
        x = [t.cuda() for t in x] if isinstance(x, list) else x.cuda()
    twins = {"original": model, "checkpoint": checkpoint_twin(model, rev), "rewired": rev}
    reports = {}
    with _forward_guard(f"a training step of {args.spec}", x):
        for name, twin in twins.items():
            reports[name] = train_step_peak(twin, _example(x), device=(x[0] if isinstance(x, list) else x).device)
    model.zero_grad(set_to_none=True)
    base = reports["original"]
    memory: Dict[str, Any] = {
        "device": args.device,
        "metric": "peak of live tensor storage bytes during one training step (forward, backward, AdamW "
                  "step; gradients allocated before it); activations: the peak minus the model state",
        "model_state": base.baseline, "model_state_by_kind": base.baseline_by_kind}
    for name, r in reports.items():
        memory[name] = r.peak
        memory[f"{name}_activations"] = r.above_baseline
        memory[f"{name}_peak_at"] = f"{r.peak_phase}:{r.peak_op} in {r.peak_module or '-'}"
        if r.cuda is not None:
            memory[f"{name}_cuda_max_allocated"] = r.cuda["max_allocated"]
    memory["ratio"] = memory["rewired"] / memory["original"] if memory["original"] else None
    acts = base.above_baseline
    memory["activation_ratio"] = memory["rewired_activations"] / acts if acts else None
    data = {"spec": args.spec, "model_kwargs": kwargs, "input_shape": _shape_of(x),
            "rewire_options": opts.to_dict(), "report": rep_dict, "memory": memory}
    ratio = lambda v: f"{v:.0%} of original" if v is not None else "n/a"  # noqa: E731
    summary = (f"{args.spec}: {_chain_summary(rep_dict)}; step peak {_mib(memory['original'])} -> "
               f"{_mib(memory['rewired'])} ({ratio(memory['ratio'])}), activations "
               f"{_mib(memory['original_activations'])} -> {_mib(memory['rewired_activations'])} "
               f"({ratio(memory['activation_ratio'])}); checkpoint {_mib(memory['checkpoint'])}")
    lines = [f"{args.spec}  input {shape}", str(rep),
             f"step peak of one training step (forward, backward, AdamW; {args.device}, live tensor storage):",
             f"  {'':10}  {'step peak':>10}  {'activations':>11}  peak at"]
    for name, r in reports.items():
        lines.append(f"  {name:10}  {_mib(r.peak):>10}  {_mib(r.above_baseline):>11}  "
                     f"{memory[f'{name}_peak_at']}")
    lines.append(f"  model state (parameters, gradients, AdamW state, buffers, batch): {_mib(base.baseline)}; "
                 f"activations = step peak - model state")
    out.say(*lines)
    out.emit(data, summary)
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    out = _Output(args)
    # Fail fast, before any expensive work, on what can be checked up front.
    check_output_path(args.output, overwrite=args.force, inputs=[args.checkpoint] if args.checkpoint else [])
    if args.checkpoint:
        check_input_file(args.checkpoint)
    opts = _rewire_options(args)
    if args.random_init:
        torch.manual_seed(args.seed)  # reproducible random weights
    model, kwargs, x = _build(args, pretrained=args.pretrained)
    source: Dict[str, Any]
    if args.checkpoint:
        key = load_weights(model, args.checkpoint, use_ema=not args.no_ema)
        source = {"checkpoint": args.checkpoint, "state_dict_key": key}
        where = f" ('{key}')" if key else ""
        out.say(f"loaded {args.checkpoint}{where} into {args.spec}")
    elif args.pretrained:
        source = {"pretrained": True}
        out.say(f"loaded the pretrained weights of {args.spec}")
    else:
        source = {"random_init": True, "seed": args.seed}
        out.say(f"{args.spec}: random weights (--random-init)")
    buffers = snapshot_buffers(model)  # the weights written are the ones loaded
    with _forward_guard(f"rewiring {args.spec}", x):
        rev = rewire(model, _example(x), opts)
    restore_buffers(rev, buffers)
    rep = report(rev)
    rep_dict = rep.to_dict()
    out.say(str(rep))
    verified = None
    if args.verify:
        with _forward_guard(f"verifying {args.spec}", x):
            verified = verify(rev, x, seed=args.seed, tolerance=args.tolerance)
        line = _verify_line(verified)
        if not verified["ok"]:
            print(f"revwire: {line}; {args.output} not written (rerun without --verify to write it anyway)",
                  file=sys.stderr)
            if out.json:
                out.emit({"spec": args.spec, "output": None, "verify": verified, "report": rep_dict})
            return EXIT_FAILED
        out.say(line)
    save(rev, args.output, overwrite=args.force, spec=args.spec, model_kwargs=kwargs,
         input_shapes=[_shape_of(x)], extra={"source": source, "verify": verified})
    data = {"spec": args.spec, "model_kwargs": kwargs, "output": args.output, "bytes": os.path.getsize(args.output),
            "source": source, "input_shape": _shape_of(x), "rewire_options": opts.to_dict(),
            "report": rep_dict, "verify": verified}
    out.say(f"wrote {args.output} ({_size(args.output)})")
    out.emit(data)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    out = _Output(args)
    n = export_state_dict(args.source, args.output, overwrite=args.force)
    out.say(f"wrote {args.output} ({n} tensors, {_size(args.output)}): a plain state_dict of the original architecture")
    out.emit({"source": args.source, "output": args.output, "tensors": n, "bytes": os.path.getsize(args.output)})
    return EXIT_OK


# --------------------------------------------------------------------------- parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _input_size(text: str):
    try:
        return parse_input_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


_METAVARS = {"int": "N", "code": "PKG.MOD:NAME"}


def _add_option_flags(group) -> None:
    """One flag per `RewireOptions` field that names one (`dest` is the field's name)."""
    for f in dataclasses.fields(RewireOptions):
        flag, kind = f.metadata["flag"], f.metadata["kind"]
        if not flag:
            continue
        extra: Dict[str, Any] = {"choices": f.metadata["choices"]} if f.metadata["choices"] else {}
        if kind == "int":
            extra["type"] = _positive_int
        if kind == "bool":  # --flag / --no-flag; None (the default) when neither is given
            extra["action"] = argparse.BooleanOptionalAction
        if kind == "code":
            extra["action"] = "append"
            doc = f"{f.metadata['doc']} (repeatable)"
        else:
            doc = f"{f.metadata['doc']} (default: {f.default})"
        group.add_argument(flag, dest=f.name, metavar=_METAVARS.get(kind), help=doc, **extra)


def _common(p: argparse.ArgumentParser, *, model: bool = True, json_output: bool = True) -> None:
    if model:
        p.add_argument("spec", metavar="SPEC",
                       help="timm:NAME, torchvision:NAME or module:package.module:factory")
        g = p.add_argument_group("model")
        g.add_argument("--model-kwargs", nargs="+", metavar="K=V", default=[],
                       help="constructor arguments, e.g. num_classes=7 drop_path_rate=0.1")
        g.add_argument("--input-size", type=_input_size, metavar="C,H,W",
                       help="per-sample input size, C,H,W or C,T,H,W (default: the model's own)")
        g.add_argument("--batch", type=_positive_int, default=1, metavar="N", help="batch size (default: 1)")
        g.add_argument("--seed", type=int, default=0, help="seed of the random input / weights (default: 0)")
        _add_option_flags(p.add_argument_group("rewiring (defaults: the compiler's)"))
    o = p.add_argument_group("output")
    o.add_argument("-q", "--quiet", action="store_true", help="print only a one-line summary (or nothing)")
    if json_output:
        o.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revwire",
        formatter_class=_Formatter,
        description="Rewire residual PyTorch models into reversible twins that recompute\n"
                    "activations instead of storing them.",
        epilog="examples:\n"
               "  revwire inspect timm:resnet50 --input-size 3,160,160\n"
               "  revwire convert timm:vit_base_patch16_224 --checkpoint w.safetensors -o rev.pt --verify\n"
               "  revwire export rev.pt -o plain.pth\n\n"
               "Bad input gives one line `revwire: error: ...` on stderr and exit status 2.",
    )
    parser.add_argument("--version", action="version", version=f"revwire {__version__}")
    parser.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "inspect", formatter_class=_Formatter,
        help="show the residual chains and the step peak memory, original vs checkpoint vs rewired",
        description="Build the model (random weights), rewire it, and print the chain table and the\n"
                    "step peak memory of one training step (forward, backward, AdamW) of the original,\n"
                    "its torch.utils.checkpoint twin (every residual block) and the rewired model.",
        epilog="example:\n  revwire inspect timm:resnet18 --input-size 3,128,128",
    )
    _common(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the steps run (default: cpu); the same meter on both, and on CUDA "
                        "the allocator's max_memory_allocated too (--json)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert", formatter_class=_Formatter,
        help="load weights, rewire, (verify,) write a revwire file",
        description="Load weights into the model strictly, as timm does (a state_dict, or a dict holding\n"
                    "one under 'state_dict' / 'model' / EMA keys; 'module.' prefixes; .safetensors),\n"
                    "rewire it, and write OUT atomically: the spec, the rewire options, the revwire\n"
                    "version and the state_dict. Load it in Python with revwire.load(OUT).",
        epilog="example:\n  revwire convert timm:resnet18 --checkpoint resnet18.pth -o resnet18-rev.pt --verify",
    )
    _common(p)
    src = p.add_argument_group("weights (one of)").add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file (.pth, .pt, .bin, .safetensors)")
    src.add_argument("--pretrained", action="store_true",
                     help="the library's own pretrained weights (needs network access or a cache)")
    src.add_argument("--random-init", action="store_true", help="random weights (for trying things out)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the revwire file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-ema", action="store_true",
                   help="use 'state_dict' / 'model' even where the file has EMA weights (timm prefers EMA)")
    p.add_argument("--verify", action="store_true",
                   help="check reversible vs autograd gradients on a random batch; write nothing if they differ")
    p.add_argument("--tolerance", type=float, default=1e-3, metavar="REL",
                   help="largest relative gradient error --verify accepts (default: 1e-3; wrong "
                        "gradients are off by O(1))")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export", formatter_class=_Formatter,
        help="write the plain state_dict of a revwire file",
        description="Write the state_dict of a revwire file (from `revwire convert` or revwire.save,\n"
                    "e.g. after fine-tuning) as a plain state_dict that loads with strict=True into the\n"
                    "original architecture. An OUT ending in .safetensors is written as safetensors.",
        epilog="example:\n  revwire export finetuned-rev.pt -o finetuned.pth",
    )
    p.add_argument("source", metavar="FILE", help="a revwire file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the plain state_dict to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _common(p, model=False)
    p.set_defaults(func=cmd_export)
    return parser


def _showwarning(message, category, filename, lineno, file=None, line=None):
    print(f"revwire: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    with warnings.catch_warnings():
        if args.quiet or getattr(args, "json", False):
            warnings.simplefilter("ignore")
        else:
            warnings.showwarning = _showwarning
        try:
            return args.func(args)
        except RewireError as e:
            if args.traceback:
                raise
            print(f"revwire: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("revwire: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.traceback:
                raise
            print(f"revwire: internal error: {type(e).__name__}: {_one_line(e)[:300]} "
                  f"(rerun with --traceback and report it)", file=sys.stderr)
            return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
