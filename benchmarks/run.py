"""`python -m benchmarks.run`: vanilla vs torch.utils.checkpoint vs revwire, side by side.

    python -m benchmarks.run --quick                 # tiny sizes, CPU, a few minutes
    python -m benchmarks.run                         # CPU: the cpu sizes; CUDA: the gpu sizes
    python -m benchmarks.run --suite image --dtype bfloat16
    python -m benchmarks.run --suite video --models swin3d_t --no-time

Every size of every case records the step peak and the activation peak of each method
(`revwire.train_step_peak`, one meter on every device) and the step time.

Writes benchmarks/results/<device-slug>.json (records merged with what the file already
holds: a record replaces an older one with the same model / method / dtype / size), and
regenerates <slug>.md and <slug>.png (the PNG needs matplotlib; it is skipped otherwise).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from . import measure, plot
from .methods import ALL_METHODS, METHODS, prepare
from .suites import PROFILES, SUITES, Case, cases, make_batch

KEYS = ("model", "method", "device", "dtype", "batch", "frames", "input", "step_peak_bytes",
        "act_peak_bytes", "step_ms", "max_fit", "torch", "date")
# Extra keys: suite, depth, axis, threads (CPU), sizes (the profile), base_mem_bytes (the model state
# alive at the step's start: parameters, gradients, AdamW state, buffers, batch; step_peak_bytes -
# base_mem_bytes = act_peak_bytes), base_by_kind, phase_act_peaks (forward / backward / optimizer, above
# the model state), fwbw_act_peak_bytes (the same over forward + backward only: without the AdamW
# step's temporaries), peak_at (phase:op), peak_module, at_peak (largest groups alive at the peak, model
# state left out; at_peak_by_op: the same summed over modules), cuda_peak_bytes / cuda_base_bytes (CUDA: the allocator's max_memory_allocated and
# memory_allocated over the same step), step_ms_iqr, repeats, max_fit_capped, chains, checkpointed, error.
COMMAND = {"line": None, "machine": None}  # this run's command line and --machine, for the records
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_profile(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def device_slug(device: torch.device, profile: str) -> str:
    """`cpu`, `cuda-nvidia-h100-80gb-hbm3`, ...; `-<profile>` when not the device's own sizes."""
    slug = device.type
    if device.type == "cuda":
        slug = "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return slug + ("" if profile == default_profile(device) else f"-{profile}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def record_key(r: Dict) -> tuple:
    return (r.get("suite"), r["model"], r["method"], r["dtype"], r["batch"], r["frames"],
            r["input"], r.get("max_fit") is not None)


def new_record(case: Case, method: str, device: torch.device, dtype: str, size: Optional[int],
               profile: Optional[str] = None) -> Dict:
    if size is None:
        batch = frames = shape = None
    else:
        batch, frames = case.batch_frames(size)
        shape = "x".join(map(str, case.input_shape(size)))
    r = {k: None for k in KEYS}
    r.update(model=case.name, method=method, device=device_name(device), dtype=dtype, batch=batch,
             frames=frames, input=shape, torch=torch.__version__,
             date=datetime.datetime.now().isoformat(timespec="seconds"),
             suite=case.suite, depth=case.depth, axis=case.axis, sizes=profile,
             command=COMMAND["line"], machine=COMMAND["machine"],
             threads=torch.get_num_threads() if device.type == "cpu" else None)
    return r


class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.time()

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {text}", file=self.stream, flush=True)

    def tick(self, text: str) -> None:
        self.done += 1
        self.say(f"({self.done}/{self.total}) {text}")


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def measure_one(module, x, target, amp, device, args) -> Dict:
    """Step time, then the step peak and activation peak of one method at one size."""
    out: Dict = {}
    opt = measure.make_optimizer(module)
    step = lambda: measure.train_step(module, opt, x, target, amp)  # noqa: E731
    try:
        if args.repeats > 0:
            times = measure.step_times_ms(step, device, args.warmup, args.repeats)
            out["step_ms"] = float(statistics.median(times))
            q = sorted(times)
            out["step_ms_iqr"] = q[(3 * len(q)) // 4] - q[len(q) // 4]
            out["repeats"] = len(times)
        out.update(measure.step_memory(module, opt, x, target, amp))
    except Exception as e:  # noqa: BLE001
        if not measure.is_oom(e):
            raise
        out["error"] = "out of memory"
    finally:
        step = opt = None  # noqa: F841
        module.zero_grad(set_to_none=True)
        measure.release(device)
    return out


def run_case(case: Case, device: torch.device, args, progress: Progress) -> List[Dict]:
    records: List[Dict] = []
    torch.manual_seed(args.seed)
    model = case.build().to(device).train()
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    example, _ = make_batch(case, case.sizes[0], device, seed=args.seed)
    t0 = time.time()
    # One rewire per case: the rewired graph does not depend on batch or frame count.
    modules, info = prepare(model, example[:1], args.methods)
    del example
    progress.say(f"{case.name}: rewired in {time.time() - t0:.1f}s, chains {info['chains']}, "
                 f"{info.get('checkpointed', '-')} checkpointed blocks")
    sizes = [n for n in case.sizes if not args.size or n in args.size]
    for size in (sizes if args.repeats >= 0 else []):
        x, target = make_batch(case, size, device, seed=args.seed)
        for dtype in args.dtype:
            amp = measure.autocast_dtype(dtype)
            for method in args.methods:
                model.load_state_dict(snapshot)
                r = new_record(case, method, device, dtype, size, args.sizes)
                r["chains"], r["checkpointed"] = info["chains"], info.get("checkpointed")
                r.update(measure_one(modules[method], x, target, amp, device, args))
                records.append(r)
                progress.tick(f"{case.name} {r['input']} {dtype:8s} {method:10s} "
                              + (r.get("error") or
                                 f"step {r['step_ms'] or float('nan'):8.1f} ms  "
                                 f"step peak {_mib(r['step_peak_bytes'])}  "
                                 f"activations {_mib(r['act_peak_bytes'])} ({r['peak_at']})"))
        del x, target
        measure.release(device)
    if args.max_fit and case.max_fit:
        cfg = dict(case.max_fit)
        if args.max_fit_limit:
            cfg["limit"] = max(cfg["start"], args.max_fit_limit)
        for dtype in args.max_fit_dtype:
            amp = measure.autocast_dtype(dtype)
            for method in args.methods:
                model.load_state_dict(snapshot)
                fits = measure.fits_once(modules[method],
                                         lambda n: make_batch(case, n, device, seed=args.seed), amp, device)
                n, capped = measure.max_fit(
                    fits, cfg["start"], cfg["limit"], cfg["granularity"],
                    progress=lambda n, ok, m=method: progress.say(
                        f"  max-fit {case.name} {dtype} {m}: {case.axis} {n} {'fits' if ok else 'OOM'}"))
                r = new_record(case, method, device, dtype, None, args.sizes)
                r.update(max_fit=n, max_fit_capped=capped, chains=info["chains"],
                         checkpointed=info.get("checkpointed"))
                records.append(r)
                progress.tick(f"{case.name} {dtype} {method}: max {case.axis} {n}{'+' if capped else ''}")
    model.load_state_dict(snapshot)
    del modules, model
    gc.collect()
    measure.release(device)
    return records


def merge(old: List[Dict], new: List[Dict]) -> List[Dict]:
    fresh = {record_key(r) for r in new}
    return [r for r in old if record_key(r) not in fresh] + new


def write_results(records: List[Dict], slug: str, out_dir: str, do_plot: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{slug}.json"), "md": os.path.join(out_dir, f"{slug}.md")}
    with open(paths["json"], "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(plot.markdown(records, title=f"revwire benchmarks: {slug}"))
    if do_plot:
        png = os.path.join(out_dir, f"{slug}.png")
        if plot.plot(records, png):
            paths["png"] = png
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU (a few minutes): --sizes quick")
    p.add_argument("--sizes", choices=PROFILES, default=None,
                   help="size profile (default: gpu on CUDA, cpu on a CPU; see benchmarks/suites.py)")
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="keep only these sizes (batch or frame counts) of each case")
    p.add_argument("--suite", action="extend", nargs="+", choices=SUITES, help=f"suites to run (default: all of {SUITES})")
    p.add_argument("--models", nargs="+", help="only cases whose name contains one of these")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS)
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"),
                   help="autocast off (float32) / bf16 autocast (default: both on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; CPU 3)")
    p.add_argument("--no-time", action="store_true", help="skip the per-size measurements (max-fit only)")
    p.add_argument("--max-fit", dest="max_fit", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest batch / frame count that fits (default: on for CUDA)")
    p.add_argument("--max-fit-dtype", nargs="+", default=["bfloat16"], choices=("float32", "bfloat16"))
    p.add_argument("--max-fit-limit", type=int, default=None, help="upper bound of the search")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; ignored on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--slug", default=None, help="results file name (default: from the device)")
    p.add_argument("--fresh", action="store_true", help="overwrite the results file instead of merging")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--machine", default=None,
                   help="a description of the machine, kept in the records (e.g. '2 shared CPU cores, no GPU')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    COMMAND["line"] = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    COMMAND["machine"] = args.machine
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and args.sizes not in (None, "quick"):
        print("--quick means --sizes quick", file=sys.stderr)
        return 2
    args.sizes = "quick" if args.quick else (args.sizes or default_profile(device))
    on_cpu = device.type == "cpu"
    args.suite = args.suite or list(SUITES)
    args.dtype = args.dtype or (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    args.repeats = args.repeats if args.repeats is not None else (3 if on_cpu else 10)
    if args.no_time:
        args.repeats = -1
    if args.max_fit is None:
        args.max_fit = device.type == "cuda"
    if args.max_fit and device.type != "cuda":
        print("note: the max-fit search on CPU is bounded by host RAM, not a GPU; it is off by default",
              file=sys.stderr)
    if device.type == "cuda" and (args.warmup < 3 or args.repeats < 10) and args.sizes != "quick":
        print("note: issue 5 asks for >= 3 warm-up steps and the median of >= 10", file=sys.stderr)
    if device.type == "cpu":
        # One thread by default: on a shared CPU, OpenMP threads spinning against other jobs
        # made steps up to 50x slower (resnet50 at 64² batch 2: 23 s a step with 2 threads).
        torch.set_num_threads(max(1, args.threads))

    todo = cases(args.sizes, args.suite, args.models)
    if not todo:
        print("no case selected", file=sys.stderr)
        return 2
    n_sizes = sum(len([n for n in c.sizes if not args.size or n in args.size]) for c in todo)
    per_size = 0 if args.repeats < 0 else n_sizes * len(args.dtype) * len(args.methods)
    fit = sum(1 for c in todo if c.max_fit) * len(args.max_fit_dtype) * len(args.methods) if args.max_fit else 0
    progress = Progress(per_size + fit)
    slug = args.slug or device_slug(device, args.sizes)
    progress.say(f"device {device_name(device)} ({slug}), sizes {args.sizes}, torch {torch.__version__}, "
                 f"{len(todo)} case(s), methods {args.methods}, dtypes {args.dtype}, "
                 f"warm-up {args.warmup}, repeats {max(args.repeats, 0)}, max-fit {args.max_fit}")
    records: List[Dict] = []
    for case in todo:
        records += run_case(case, device, args, progress)

    path = os.path.join(args.out_dir, f"{slug}.json")
    old: List[Dict] = []
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            old = json.load(f)
    paths = write_results(merge(old, records), slug, args.out_dir, do_plot=not args.no_plot)
    progress.say("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
