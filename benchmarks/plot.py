"""Render benchmark records: a markdown report (tables, where the peak is, issue 10's
targets) and a PNG plot (activation peak vs frames, depth and layers, one line per method).

The PNG needs matplotlib, which is not a dependency of revwire: without it `plot` prints a
note and returns False.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

from .methods import ALL_METHODS

METHODS = ("vanilla", "checkpoint", "revwire")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _ratio(v, ref) -> str:
    return f" ({v / ref:.2f}×)" if v is not None and ref else ""


def _cell(rows: Dict[str, Dict], method: str, key: str, fmt) -> str:
    r = rows.get(method)
    if r is None:
        return "-"
    if r.get("error"):
        return "OOM" if "memory" in r["error"] else "error"
    v = r.get(key)
    ref = rows.get("vanilla", {}).get(key) if method != "vanilla" else None
    mark = "†" if key in ("step_peak_bytes", "act_peak_bytes") and str(r.get("peak_at", "")).startswith("optimizer") else ""
    return fmt(v) + mark + _ratio(v, ref)


def _size_sort(r: Dict) -> tuple:
    return (r.get("depth") or 0, r.get("batch") or 0, r.get("frames") or 0)


def _groups(records: Sequence[Dict], suite: str) -> "OrderedDict[tuple, Dict[str, Dict]]":
    rows = [r for r in records if r.get("suite") == suite and r.get("max_fit") is None and r.get("input")]
    order: Dict[str, int] = {}
    for r in sorted(rows, key=_size_sort):
        order.setdefault(r["model"].rstrip("0123456789"), len(order))
    rows.sort(key=lambda r: (order[r["model"].rstrip("0123456789")], r["dtype"], _size_sort(r)))
    groups: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["model"], r["input"], r["dtype"]), {})[r["method"]] = r
    return groups


def _rev_over_ckpt(rows: Dict[str, Dict], key: str = "act_peak_bytes") -> Optional[float]:
    c, w = rows.get("checkpoint", {}).get(key), rows.get("revwire", {}).get(key)
    return w / c if c and w is not None else None


def suite_table(records: Sequence[Dict], suite: str) -> str:
    groups = _groups(records, suite)
    if not groups:
        return ""
    cols = [("step peak MiB", "step_peak_bytes", _mib), ("activation peak MiB", "act_peak_bytes", _mib)]
    has_cuda = any(r.get("cuda_peak_bytes") is not None for g in groups.values() for r in g.values())
    if has_cuda:
        cols.append(("CUDA max_allocated MiB", "cuda_peak_bytes", _mib))
    cols.append(("step ms", "step_ms", _ms))
    methods = [m for m in ALL_METHODS if any(m in g for g in groups.values())]
    head = ["model", "input", "dtype"]
    for title, _, _ in cols:
        head += [f"{title} {m}" for m in methods]
        if title.startswith("activation"):
            head.append("activations revwire / checkpoint")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (model, shape, dtype), rows in groups.items():
        cells = [model, shape, DTYPE_SHORT.get(dtype, dtype)]
        for title, key, fmt in cols:
            cells += [_cell(rows, m, key, fmt) for m in methods]
            if title.startswith("activation"):
                v = _rev_over_ckpt(rows)
                cells.append("-" if v is None else f"{v:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peak_table(records: Sequence[Dict]) -> str:
    """Where each method's step peak is, and the largest groups alive there (model state
    left out): what the engine work should look at."""
    rows = [r for r in records if r.get("max_fit") is None and r.get("input") and r.get("peak_at")]
    if not rows:
        return ""
    lines = ["| model | input | dtype | method | peak at | largest groups alive at the peak, by op (besides the "
             "model state; module: the largest group's, (+n) other modules) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        groups = "; ".join(f"{_mib(g['bytes'])} MiB {g['count']}× {g['phase']}:{g['op']} in "
                           f"{g['module'] or '-'}" for g in (r.get("at_peak_by_op") or r.get("at_peak") or [])[:3])
        lines.append(f"| {r['model']} | {r['input']} | {DTYPE_SHORT.get(r['dtype'], r['dtype'])} | {r['method']} "
                     f"| {r['peak_at']} in {r.get('peak_module') or '-'} | {groups or '-'} |")
    return "\n".join(lines)


def max_fit_table(records: Sequence[Dict]) -> str:
    rows = [r for r in records if r.get("max_fit") is not None]
    if not rows:
        return ""
    groups: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["model"], r.get("axis") or "batch", r["dtype"]), {})[r["method"]] = r
    head = ["model", "axis", "dtype"] + list(METHODS)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (model, axis, dtype), g in groups.items():
        cells = [model, axis, DTYPE_SHORT.get(dtype, dtype)]
        ref = g.get("vanilla", {}).get("max_fit")
        for m in METHODS:
            r = g.get(m)
            if r is None:
                cells.append("-")
                continue
            v = r["max_fit"]
            cells.append(f"{v}{'+' if r.get('max_fit_capped') else ''}"
                         + (_ratio(v, ref) if m != "vanilla" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _largest(records: Sequence[Dict], keep: Callable[[Dict], bool]) -> Dict[str, Dict]:
    """{method: record} at the largest size (then latest) among the records `keep` selects
    that have all three methods measured without error."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in records:
        if keep(r) and r.get("max_fit") is None and r.get("input") and not r.get("error"):
            groups.setdefault((r["input"], r["dtype"]), {})[r["method"]] = r
    full = [(k, g) for k, g in groups.items() if all(m in g for m in METHODS)]
    if not full:
        return {}
    return max(full, key=lambda kg: (_size_sort(kg[1]["revwire"]), kg[1]["revwire"].get("date") or ""))[1]


def _ratio_target(name: str, g: Dict[str, Dict], key: str, limit: float, against: str) -> tuple:
    w, ref = g.get("revwire", {}).get(key), g.get(against, {}).get(key)
    if w is None or not ref:
        return (name, "-", "pending")
    ratio = w / ref
    where = g["revwire"]["input"]
    figures = f"{_ms(w)} vs {_ms(ref)} ms" if key == "step_ms" else f"{_mib(w)} vs {_mib(ref)} MiB"
    return (name, f"{ratio:.2f}× ({figures}, {where})", "met" if ratio <= limit else "NOT met")


def _flat_target(name: str, figures: Dict[int, int], need: Sequence[int]) -> tuple:
    if not all(d in figures for d in need):
        return (name, "-", "pending")
    vals = {d: figures[d] for d in need}
    spread = max(vals.values()) / min(vals.values()) - 1 if min(vals.values()) > 0 else float("inf")
    return (name, f"+{spread * 100:.1f}% ({', '.join(f'{d}: {_mib(b)} MiB' for d, b in sorted(vals.items()))})",
            "met" if spread <= 0.10 else "NOT met")


def targets(records: Sequence[Dict]) -> List[tuple]:
    """Issue 10's targets: (target, measured, status) with status met / NOT met / pending.
    Activation-peak targets read the records of any device; the GPU targets read CUDA
    records only."""
    records = list(records)
    out = []
    model = lambda name: (lambda r: r.get("model") == name)  # noqa: E731
    g = _largest(records, model("prenorm_l12"))
    out.append(_ratio_target("transformer 12 layers: revwire activation peak ≤ 0.6× checkpoint",
                             g, "act_peak_bytes", 0.6, "checkpoint"))
    g24 = _largest(records, model("prenorm_l24"))
    out.append(_ratio_target("transformer 24 layers: revwire activation peak ≤ 0.4× checkpoint",
                             g24, "act_peak_bytes", 0.4, "checkpoint"))
    act = {}
    for n in (6, 12, 24):
        r = _largest(records, model(f"prenorm_l{n}")).get("revwire")
        if r and r.get("fwbw_act_peak_bytes") is not None:
            act[n] = r["fwbw_act_peak_bytes"]
    out.append(_flat_target("transformer 6 → 24 layers: revwire forward + backward activation peak within 10% "
                            "(flat)", act, (6, 12, 24)))
    out.append(_ratio_target("transformer 12 layers: revwire step time ≤ 1.05× checkpoint (step incl. AdamW)",
                             g, "step_ms", 1.05, "checkpoint"))
    vit12 = _largest(records, lambda r: r.get("model") in ("vit_base_patch16_224", "vit_b_depth12")
                     and r.get("device") == "cpu")
    out.append(_ratio_target("ViT-B/16 depth 12: revwire activation peak ≤ 0.8× checkpoint",
                             vit12 or _largest(records, model("vit_b_depth12")), "act_peak_bytes", 0.8, "checkpoint"))
    out.append(_ratio_target("ViT-B/16 depth 24: revwire activation peak ≤ 0.5× checkpoint",
                             _largest(records, model("vit_b_depth24")), "act_peak_bytes", 0.5, "checkpoint"))
    out.append(_ratio_target("swin3d_t: revwire activation peak ≤ 0.95× checkpoint",
                             _largest(records, lambda r: r.get("model") == "swin3d_t" and r.get("dtype") == "float32")
                             or _largest(records, model("swin3d_t")), "act_peak_bytes", 0.95, "checkpoint"))
    for name in ("resnet18", "r3d_18"):
        out.append(_ratio_target(f"{name}: revwire activation peak ≤ checkpoint (with item 4)",
                                 _largest(records, model(name)), "act_peak_bytes", 1.0, "checkpoint"))
    # GPU (item 7)
    cuda = [r for r in records if r.get("device") not in (None, "cpu")]
    g = _largest(cuda, lambda r: r.get("model") == "vit_base_patch16_224" and r.get("batch") == 128
                 and r.get("dtype") == "bfloat16")
    v, c, w = (g.get(m, {}) for m in METHODS)
    name = "GPU ViT-B/16 b128 bf16: revwire step peak ≤ 0.26× vanilla and ≤ checkpoint"
    if v.get("step_peak_bytes") and w.get("step_peak_bytes") and c.get("step_peak_bytes"):
        a, b = w["step_peak_bytes"] / v["step_peak_bytes"], w["step_peak_bytes"] / c["step_peak_bytes"]
        out.append((name, f"{a:.2f}× vanilla, {b:.2f}× checkpoint", "met" if a <= 0.26 and b <= 1 else "NOT met"))
    else:
        out.append((name, "-", "pending"))
    out.append(_ratio_target("GPU ViT-B/16 b128 bf16: revwire step time ≤ 1.30× vanilla", g, "step_ms", 1.30, "vanilla"))
    fit = {r["method"]: r["max_fit"] for r in cuda
           if r.get("model") == "swin3d_t" and r.get("dtype") == "bfloat16" and r.get("max_fit") is not None}
    name = "GPU swin3d_t 224² bf16: largest T ≥ 3× vanilla's and ≥ 1.1× checkpoint's"
    if fit.get("vanilla") and fit.get("checkpoint") and fit.get("revwire") is not None:
        a, b = fit["revwire"] / fit["vanilla"], fit["revwire"] / fit["checkpoint"]
        out.append((name, f"{fit['revwire']} frames: {a:.2f}× vanilla, {b:.2f}× checkpoint",
                    "met" if a >= 3 and b >= 1.1 else "NOT met"))
    else:
        out.append((name, "-", "pending"))
    depth = {r["depth"]: r["fwbw_act_peak_bytes"] for r in cuda
             if r.get("suite") == "depth" and r.get("method") == "revwire" and r.get("dtype") == "bfloat16"
             and r.get("fwbw_act_peak_bytes") and r.get("depth") in (12, 24, 48)}
    out.append(_flat_target("GPU depth 12 → 48 (bf16): revwire forward + backward activation peak within 10%",
                            depth, (12, 24, 48)))
    return out


def markdown(records: Sequence[Dict], title: str = "revwire benchmarks") -> str:
    records = list(records)
    devices = sorted({r.get("device") for r in records if r.get("device")})
    machines = sorted({r.get("machine") for r in records if r.get("machine")})
    torches = sorted({r.get("torch") for r in records if r.get("torch")})
    dates = sorted(r.get("date") for r in records if r.get("date"))
    commands = list(OrderedDict.fromkeys(r.get("command") for r in records if r.get("command")))
    parts = [f"# {title}", ""]
    if commands:
        parts += ["Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands), ""]
    machine = f" ({'; '.join(machines)})" if machines else ""
    parts += [f"Device: {', '.join(devices) or '-'}{machine}; torch "
              f"{', '.join(torches) or '-'}; {dates[0][:10] if dates else '-'} .. {dates[-1][:10] if dates else '-'}. "
              "One training step = forward, cross-entropy, backward, AdamW step. "
              "*step peak* = the peak of live tensor storage bytes over one steady-state step, counted by "
              "`revwire.train_step_peak` (each storage once, from allocation to release; 512-byte rounding on CUDA; "
              "gradients allocated before the step, as in gradient accumulation); *activation peak* = the step "
              "peak minus the model state alive throughout (parameters, gradients, AdamW state, buffers, batch); "
              "*step* = median step time (without the meter). Ratios in parentheses are against vanilla. "
              "revwire's rewired model is a different function from the original after its first block "
              "(it is fine-tuned, not a drop-in replacement).", ""]
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    if threads:
        parts += [f"CPU step times: {', '.join(map(str, threads))} thread(s), median of "
                  f"{max((r.get('repeats') or 0) for r in records)} steps; on a shared machine they are "
                  "indicative only (memory figures are exact).", ""]
    for suite in ("image", "video", "depth", "transformer"):
        table = suite_table(records, suite)
        if table:
            parts += [f"## {suite}", "", table, ""]
    if any(str(r.get("peak_at", "")).startswith("optimizer") for r in records):
        parts += ["†: the step peak is in the AdamW step (its temporaries: on a CPU the largest parameter's "
                  "sqrt and division, on CUDA with foreach every parameter's); the forward + backward "
                  "activation peak is `fwbw_act_peak_bytes` in the JSON.", ""]
    fit = max_fit_table(records)
    if fit:
        parts += ["## Largest batch / frame count that fits", "",
                  "`+`: the search limit itself fits.", "", fit, ""]
    peaks = peak_table(records)
    if peaks:
        parts += ["## Where the peak is", "", peaks, ""]
    rows = targets(records)
    parts += ["## Issue 10 targets", "", "| target | measured | status |", "|---|---|---|"]
    parts += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if not any(r.get("device") not in (None, "cpu") for r in records):
        parts += ["", "GPU figures are pending: these results hold no CUDA measurement."]
    return "\n".join(parts) + "\n"


PANELS = (("video", "frames", "vs frames (swin3d_t)", "swin3d_t"),
          ("depth", "depth", "vs depth (ViT-B width)", None),
          ("transformer", "depth", "vs layers (pre-norm transformer)", None))


def _series(records, suite: str, x_key: str, model: Optional[str]):
    """{method: [(x, forward + backward activation peak bytes)]} for `suite`, bf16 if there is any."""
    key = "fwbw_act_peak_bytes"
    rows = [r for r in records if r.get("suite") == suite and r.get("max_fit") is None and not r.get("error")
            and r.get(key) is not None and (model is None or r.get("model") == model)]
    if not rows:
        return None, None
    dtypes = {r["dtype"] for r in rows}
    dtype = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
    series: Dict[str, Dict] = {}
    for r in rows:
        if r["dtype"] == dtype and r.get(x_key) is not None:
            series.setdefault(r["method"], {})[r[x_key]] = r[key]
    return ({m: sorted(v.items()) for m, v in series.items()},
            f"forward + backward activation peak MiB ({DTYPE_SHORT.get(dtype, dtype)})")


def plot(records: Sequence[Dict], path: str) -> bool:
    """Write the PNG; False (with a note on stderr) when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: skipped the plot {path} "
              f"(pip install matplotlib, or the 'bench' extra)", file=sys.stderr)
        return False
    data = [(s, x, t, *_series(records, s, x, m)) for s, x, t, m in PANELS]
    data = [d for d in data if d[3]]
    if not data:
        print(f"note: nothing to plot for {path}", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
    for ax, (suite, x_key, title, series, ylabel) in zip(axes[0], data):
        for m in METHODS:
            if m in series:
                xs, ys = zip(*series[m])
                ax.plot(xs, [y / 2**20 for y in ys], marker="o", label=m)
        ax.set_xlabel("layers" if suite == "transformer" else x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if x_key == "frames":
            ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
