"""How much of timm revwire can trace and rewire, with a gradient check per model.

Models: the smallest model (by parameter count, counted on the meta device) of each of
timm's model families (`timm.list_modules()`), plus a fixed, seeded sample of 200 names
from `timm.list_models()`. Every model gets random weights and a small input (its own
default size capped at 128, adjusted to what it accepts; batch 2), and runs in its own
subprocess with a time limit. Per model it records:

- `fx_plain`: whether plain `torch.fx.symbolic_trace` traces it;
- `trace`: `plain` (revwire's tracer, no help), `helped` (after passing the class that
  revwire's TraceError names as `leaf_modules=`, up to 3 times), or `failed`;
- `candidates`: same-shape adds `a + b` in the traced graph where one operand is computed
  from the other (residual-looking adds, counted independently of revwire's matcher);
- chains and blocks rewired, the gradient check (reversible vs autograd engine on the
  rewired model, train mode, same seed, float64: outputs, input and parameter gradients
  within rel 1e-6), and the seconds it took.

Rows are appended to the CSV as models finish; a rerun skips names already there, so the
run is resumable. `--summarize` only rewrites the markdown summary from the CSV.

    OMP_NUM_THREADS=1 python benchmarks/coverage.py            # run / resume, then summarize
    python benchmarks/coverage.py --summarize                    # summary only
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CSV_PATH = RESULTS / "timm_coverage.csv"
MD_PATH = RESULTS / "timm_coverage.md"
DEFAULT_CACHE = Path(os.environ.get("REVWIRE_COVERAGE_CACHE", "/tmp/revwire_timm_param_counts.json"))

FIELDS = ["name", "source", "family", "params_m", "input", "dtype", "fx_plain", "trace", "leaf_help",
          "candidates", "chains", "blocks", "chain_lengths", "grad_check", "out_rel", "grad_rel",
          "status", "category", "error", "seconds", "rewire_s"]

SAMPLE_SEED = 0
SAMPLE_SIZE = 200
MAX_PARAMS_M = 100.0
MAX_SIDE = 128
TOL = 1e-6
MEM_LIMIT = 10 * 2**30  # bytes of address space per model subprocess


# -- model selection ---------------------------------------------------------------------

def param_count_meta(name: str):
    import torch
    import timm
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # some models compute with real tensors at build time
        return None


def select_models(cache_path: Path):
    """(name, source, family) rows: the smallest model of each family, then the sample."""
    import timm
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows, seen = [], set()
    for family in sorted(timm.list_modules()):
        names = timm.list_models(module=family)
        if not names:
            continue
        counts = []
        for name in names:
            if name not in cache:
                cache[name] = param_count_meta(name)
                cache_path.write_text(json.dumps(cache))
            counts.append((cache[name] if cache[name] is not None else float("inf"), name))
        smallest = min(counts)[1]
        rows.append((smallest, "family", family))
        seen.add(smallest)
    family_of = {n: f for f in timm.list_modules() for n in timm.list_models(module=f)}
    sample = random.Random(SAMPLE_SEED).sample(sorted(timm.list_models()), SAMPLE_SIZE)
    for name in sample:
        source = "family+sample" if name in seen else "sample"
        if name in seen:
            rows = [(n, source if n == name else s, f) for n, s, f in rows]
        else:
            rows.append((name, source, family_of.get(name, "")))
    return rows, cache


# -- one model, in a subprocess -----------------------------------------------------------

def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reaches(src, dst, order) -> bool:
    """Whether graph node `src` is an ancestor of `dst` (`order`: node -> position)."""
    stack, seen = [dst], set()
    while stack:
        n = stack.pop()
        if n is src:
            return True
        if n in seen or order[n] < order[src]:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _candidates(gm) -> int:
    """Same-shape adds where one operand is computed from the other."""
    import operator
    import torch
    from torch import fx
    from revwire.compiler.shapes import info
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for n in gm.graph.nodes:
        is_add = (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)) or (
            n.op == "call_method" and n.target in ("add", "add_"))
        if not is_add or len(n.args) < 2:
            continue
        a, b = n.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if not info(a).is_tensor or info(a).shape != info(b).shape:
            continue
        if reaches(a, b, order) or reaches(b, a, order):
            count += 1
    return count


def _build(name: str, side: int):
    import timm
    try:
        return timm.create_model(name, pretrained=False, img_size=side), True
    except TypeError:
        return timm.create_model(name, pretrained=False), False


def _make_input(name: str, params_m):
    """Build the model and find a small input it accepts: (model, x, note)."""
    import torch
    import timm
    cfg = timm.get_pretrained_cfg(name)
    c, h, w = (cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224))
    tried = []
    sides = []
    for s in (min(h, MAX_SIDE), 112, 96, 64, h):
        if s not in sides:
            sides.append(s)
    for side in sides:
        try:
            if side == h:
                model, sized = timm.create_model(name, pretrained=False), False
            else:
                model, sized = _build(name, side)
            model.eval()
            x = torch.randn(2, c, side, side if side != h else w)
            with torch.no_grad():
                model(x)
            return model, x, tried
        except Exception as e:
            tried.append(f"{side}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    raise RuntimeError("no input size worked: " + " | ".join(tried))


def _loss(out):
    import torch
    if isinstance(out, (tuple, list)):
        out = out[0]
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return (out * w).sum(), out


def _step(model, engine, x, state):
    import torch
    import revwire
    model.load_state_dict(state)
    revwire.set_engine(model, engine)
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    loss, out = _loss(model(xi))
    loss.backward()
    return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _classify(error: str) -> str:
    rules = [
        ("timeout", "timeout"),
        ("MemoryError", "out of memory"),
        ("no input size worked", "build/input"),
        ("TraceError", "trace: " + _trace_kind(error)),
        ("InputError", "shape propagation (InputError)"),
        ("BlockShapeError", "block shape"),
        ("ReconstructionError", "reconstruction"),
        ("internal error", "compiler internal error"),
        ("RewireError", "rewire error"),
        ("grad mismatch", "gradient mismatch"),
        ("out mismatch", "output mismatch"),
    ]
    for key, cat in rules:
        if key in error:
            return cat
    return "other: " + error.split(":")[0][:60]


def _trace_kind(error: str) -> str:
    m = re.search(r": (\w+Error|\w+Exception): (.{0,70})", error)
    if not m:
        return "other"
    msg = m.group(2)
    if "iteration" in msg or "iterate" in msg:
        return "iterating a Proxy"
    if "control flow" in msg or "symbolically traced variables cannot be used as inputs" in msg:
        return "data-dependent control flow"
    if "len(" in msg or "len()" in msg:
        return "len() of a Proxy"
    return f"{m.group(1)}: {msg[:50]}"


def run_one(name: str, params_m, out_q) -> None:
    """Worker body: fills a result row and puts it on out_q."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:  # the machine is shared: a runaway model fails with MemoryError instead of swapping others out
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    import revwire
    from revwire.errors import NoChainError, TraceError
    from revwire.compiler.shapes import propagate
    from revwire.compiler.trace import trace
    row = {k: "" for k in FIELDS}
    row["name"] = name
    t0 = time.time()
    try:
        model, x, _ = _make_input(name, params_m)
        model = model.double()
        x = x.double()
        row["dtype"] = "float64"
        row["input"] = "x".join(map(str, x.shape))
        row["params_m"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
        try:
            torch.fx.symbolic_trace(model)
            row["fx_plain"] = "yes"
        except Exception:
            row["fx_plain"] = "no"
        leaves, helped, gm = [], [], None
        for attempt in range(4):
            try:
                gm = trace(model, 1, leaf_modules=leaves)
                break
            except TraceError as e:
                msg = str(e)
                m = re.search(r"at module '([^']*)'", msg)
                path = m.group(1) if m else ""
                if attempt == 3 or not path or path == "<model forward>":
                    raise
                cls = type(model.get_submodule(path))
                if cls in leaves:
                    raise
                leaves.append(cls)
                helped.append(cls.__name__)
        row["trace"] = "helped" if helped else "plain"
        row["leaf_help"] = ";".join(helped)
        propagate(gm, (x,))
        row["candidates"] = _candidates(gm)
        model.train()
        t1 = time.time()
        try:
            rev = revwire.rewire(model, x, leaf_modules=leaves)
        except NoChainError as e:
            row["rewire_s"] = f"{time.time() - t1:.2f}"
            row.update(chains=0, blocks=0, status="no chain", category="no chain",
                       error=str(e)[:300], grad_check="")
            return
        row["rewire_s"] = f"{time.time() - t1:.2f}"
        rep = revwire.report(rev)
        row["chains"] = len(rep.chains)
        row["blocks"] = rep.num_blocks
        row["chain_lengths"] = " ".join(str(c.num_blocks) for c in rep.chains)
        rev.train()
        state = {k: v.clone() for k, v in rev.state_dict().items()}
        ag = _step(rev, "autograd", x, state)
        rv = _step(rev, "reversible", x, state)
        out_rel = _rel(rv[0], ag[0])
        x_rel = _rel(rv[1], ag[1]) if ag[1] is not None else 0.0
        keys = set(ag[2]) | set(rv[2])
        missing = sorted(k for k in keys if k not in ag[2] or k not in rv[2])
        # Per-parameter relative error, the denominator floored at 1e-6 of the norm of all
        # gradients: some gradients are zero in exact arithmetic (a BatchNorm bias followed by
        # another train-mode norm) and only rounding noise in both engines.
        total = sum(float(g.double().norm()) ** 2 for g in ag[2].values()) ** 0.5
        p_rel = max([float((rv[2][k].double() - ag[2][k].double()).norm())
                     / max(float(ag[2][k].double().norm()), 1e-6 * total, 1e-300)
                     for k in keys if k in ag[2] and k in rv[2]] or [0.0])
        row["out_rel"] = f"{out_rel:.2e}"
        row["grad_rel"] = f"{max(x_rel, p_rel):.2e}"
        ok = out_rel <= TOL and x_rel <= TOL and p_rel <= TOL and not missing
        row["grad_check"] = "pass" if ok else "fail"
        if ok:
            row["status"] = "ok"
        else:
            row["status"] = "error"
            why = "out mismatch" if out_rel > TOL else "grad mismatch"
            row["error"] = (f"{why}: out {out_rel:.2e}, x grad {x_rel:.2e}, param grad {p_rel:.2e}"
                            + (f", grads missing in one engine: {missing[:3]}" if missing else ""))
            row["category"] = _classify(row["error"])
    except MemoryError:
        row.update(status="error", category="out of memory", error="MemoryError")
    except Exception as e:
        msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if not row["trace"] and ("TraceError" in msg):
            row["trace"] = "failed"
        elif not row["trace"] and not row["input"]:
            row["trace"] = ""
        elif not row["trace"]:
            row["trace"] = "failed"
        row.update(status="error", error=msg[:600], category=_classify(msg))
        tb = traceback.format_exc().splitlines()
        row["error"] += " @ " + " / ".join(l.strip() for l in tb[-3:-1])[:300]
    finally:
        row["seconds"] = f"{time.time() - t0:.1f}"
        out_q.put(row)


def run_in_subprocess(name, params_m, timeout):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_one, args=(name, params_m, q))
    t0 = time.time()
    p.start()
    row = None
    try:
        row = q.get(timeout=timeout)
    except Exception:
        pass
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if row is None:
        row = {k: "" for k in FIELDS}
        row.update(name=name, status="error", category="timeout" if time.time() - t0 >= timeout else "crash",
                   error=f"no result after {time.time() - t0:.0f}s (limit {timeout}s, exit code {p.exitcode})",
                   seconds=f"{time.time() - t0:.1f}")
    return row


# -- summary ------------------------------------------------------------------------------

def read_rows():
    if not CSV_PATH.exists():
        return []
    with open(CSV_PATH, newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}  # a rerun's row replaces an older one
    return list(rows.values())


def summarize(total_planned=None, command=None):
    import timm
    import torch
    rows = read_rows()
    n = len(rows)
    attempted = [r for r in rows if r["status"] != "skipped"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    built = [r for r in attempted if r["input"]]
    traced = [r for r in built if r["trace"] in ("plain", "helped")]
    plain = [r for r in built if r["trace"] == "plain"]
    fx_plain = [r for r in built if r["fx_plain"] == "yes"]
    with_cand = [r for r in traced if r["candidates"] and int(r["candidates"]) >= 2]
    rewired = [r for r in traced if r["chains"] and int(r["chains"]) > 0]
    ok = [r for r in rewired if r["grad_check"] == "pass"]
    ok_cand = [r for r in with_cand if r["grad_check"] == "pass"]

    def pct(a, b):
        return f"{100.0 * len(a) / len(b):.1f}% ({len(a)}/{len(b)})" if b else "n/a (0)"

    partial = total_planned is not None and n < total_planned
    lines = [
        "# timm coverage of revwire" + (" (PARTIAL RUN)" if partial else ""),
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, timm {timm.__version__}, CPU, random weights, float64, batch 2, "
        f"side <= {MAX_SIDE} where the model accepts it",
        f"- command: `{command or 'OMP_NUM_THREADS=1 python benchmarks/coverage.py'}` (resumable; "
        f"rows in `benchmarks/results/timm_coverage.csv`)",
        f"- models: smallest of each of timm's {len(timm.list_modules())} families + seeded sample of "
        f"{SAMPLE_SIZE} of {len(timm.list_models())} names (seed {SAMPLE_SEED}); "
        f"models over {MAX_PARAMS_M:.0f}M parameters skipped",
    ]
    if total_planned is not None:
        lines.append(f"- progress: {n} of {total_planned} models done" + (" — **partial**" if partial else ""))
    lines += [
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| models attempted (built with an input) | {len(built)} of {len(attempted)} ({len(skipped)} skipped > {MAX_PARAMS_M:.0f}M params) |",
        f"| plain `torch.fx.symbolic_trace` | {pct(fx_plain, built)} |",
        f"| **revwire tracing success** (plain or helped) | **{pct(traced, built)}** |",
        f"| revwire tracing with no help | {pct(plain, built)} |",
        f"| traced models with >= 2 same-shape residual-looking adds | {len(with_cand)} |",
        f"| **of those: rewired with gradient check passing** | **{pct(ok_cand, with_cand)}** |",
        f"| rewired (>= 1 chain) | {len(rewired)} of {len(traced)} traced |",
        f"| rewired with gradient check passing | {pct(ok, rewired)} |",
        "",
        "The gradient check compares the reversible engine with the autograd engine on the rewired",
        f"model (train mode, same seed): outputs, input and parameter gradients within rel {TOL:g}",
        "(a parameter gradient's error is relative to its norm floored at 1e-6 of all gradients' norm).",
        "'Residual-looking adds' are same-shape adds where one operand is computed from the other",
        "(counted on the traced graph independently of revwire's matcher).",
        "",
        "## Failures and misses by category",
        "",
    ]
    cats = defaultdict(list)
    for r in attempted:
        if r["status"] == "ok":
            continue
        cat = r["category"] or r["status"]
        if cat == "no chain" and (not r["candidates"] or int(r["candidates"]) < 2):
            cat = "no chain (no residual candidates: expected)"
        elif cat == "no chain":
            cat = "no chain although >= 2 residual-looking adds"
        cats[cat].append(r)
    lines.append("| category | models | example | error (example) |")
    lines.append("| --- | --- | --- | --- |")
    for cat, rs in sorted(cats.items(), key=lambda kv: -len(kv[1])):
        ex = rs[0]
        err = ex["error"].replace("|", "\\|")[:300]
        names = ", ".join(r["name"] for r in rs[:8]) + (" ..." if len(rs) > 8 else "")
        lines.append(f"| {cat} | {len(rs)}: {names} | {ex['name']} | {err} |")
    lines.append("")
    MD_PATH.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", action="store_true", help="only rewrite the markdown summary")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new models")
    ap.add_argument("--only", nargs="*", help="run just these names (not recorded unless --record)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="parameter-count cache (JSON)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/coverage.py"
    if args.only:
        for name in args.only:
            row = run_in_subprocess(name, None, args.timeout)
            print(json.dumps(row), flush=True)
            if args.record:
                _append(row)
        return
    models, cache = select_models(args.cache)
    if args.summarize:
        print(summarize(len(models), command))
        return
    done = {r["name"] for r in read_rows()}
    todo = [(n, s, f) for n, s, f in models if n not in done]
    print(f"{len(models)} models, {len(done)} done, {len(todo)} to go", flush=True)
    for k, (name, source, family) in enumerate(todo):
        if args.limit is not None and k >= args.limit:
            break
        count = cache.get(name)
        if count is None and name not in cache:
            count = param_count_meta(name)
        params_m = None if count is None else count / 1e6
        if params_m is not None and params_m > MAX_PARAMS_M:
            row = {k2: "" for k2 in FIELDS}
            row.update(name=name, status="skipped", category="skipped (> 100M params)",
                       params_m=f"{params_m:.1f}")
        else:
            row = run_in_subprocess(name, params_m, args.timeout)
        row["source"], row["family"] = source, family
        _append(row)
        print(f"[{len(done) + k + 1}/{len(models)}] {name}: {row['status']} trace={row['trace']} "
              f"chains={row['chain_lengths']} grad={row['grad_check']} {row['seconds']}s "
              f"{row['error'][:160]}", flush=True)
        if k % 10 == 0:
            summarize(len(models), command)
    print(summarize(len(models), command))


def append_row(path, fields, row) -> None:
    """Append `row` (its `fields`, "" where missing) to the CSV at `path`, header first."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})


def _append(row):
    append_row(CSV_PATH, FIELDS, row)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
