"""Render benchmark records: a markdown report (tables + issue-5 targets) and a PNG plot.

The PNG (memory vs frames, memory vs depth, one line per method) needs matplotlib,
which is not a dependency of revwire: without it `plot` prints a note and returns False.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Dict, List, Sequence

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
    return fmt(v) + _ratio(v, ref)


def _size_sort(r: Dict) -> tuple:
    return (r.get("depth") or 0, r.get("batch") or 0, r.get("frames") or 0)


def _groups(records: Sequence[Dict], suite: str) -> "OrderedDict[tuple, Dict[str, Dict]]":
    rows = [r for r in records if r.get("suite") == suite and r.get("max_fit") is None and r.get("input")]
    order = {}
    for r in rows:
        order.setdefault(r["model"], len(order))
    rows.sort(key=lambda r: (order[r["model"]], r["dtype"], _size_sort(r)))
    groups: "OrderedDict[tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["model"], r["input"], r["dtype"]), {})[r["method"]] = r
    return groups


def suite_table(records: Sequence[Dict], suite: str) -> str:
    groups = _groups(records, suite)
    if not groups:
        return ""
    has_peak = any(r.get("peak_mem_bytes") is not None for g in groups.values() for r in g.values())
    head = ["model", "input", "dtype"]
    cols = []
    if has_peak:
        cols.append(("peak MiB", "peak_mem_bytes", _mib))
    cols += [("saved MiB", "saved_bytes", _mib), ("step ms", "step_ms", _ms)]
    for title, _, _ in cols:
        head += [f"{title} {m}" for m in METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (model, shape, dtype), rows in groups.items():
        cells = [model, shape, DTYPE_SHORT.get(dtype, dtype)]
        for _, key, fmt in cols:
            cells += [_cell(rows, m, key, fmt) for m in METHODS]
        lines.append("| " + " | ".join(cells) + " |")
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


def _find(records, **want) -> Dict[str, Dict]:
    out = {}
    for r in records:
        if all(r.get(k) == v for k, v in want.items()) and not r.get("error"):
            out[r["method"]] = r
    return out


def targets(records: Sequence[Dict]) -> List[tuple]:
    """Issue 5's GPU targets: (target, measured, status) with status met / NOT met / pending."""
    cuda = [r for r in records if r.get("device") not in (None, "cpu")]
    out = []
    g = _find(cuda, model="vit_base_patch16_224", batch=128, dtype="bfloat16", max_fit=None)
    v, c, w = (g.get(m, {}) for m in METHODS)
    if v.get("peak_mem_bytes") and w.get("peak_mem_bytes"):
        ratio = w["peak_mem_bytes"] / v["peak_mem_bytes"]
        ok = ratio <= 0.25 and (not c.get("peak_mem_bytes") or w["peak_mem_bytes"] <= c["peak_mem_bytes"])
        cm = f", checkpoint {c['peak_mem_bytes'] / v['peak_mem_bytes']:.2f}×" if c.get("peak_mem_bytes") else ""
        out.append(("ViT-B/16 b128 bf16: revwire peak ≤ 0.25× vanilla and ≤ checkpoint",
                    f"revwire {ratio:.2f}×{cm}", "met" if ok else "NOT met"))
    else:
        out.append(("ViT-B/16 b128 bf16: revwire peak ≤ 0.25× vanilla and ≤ checkpoint", "-", "pending"))
    if v.get("step_ms") and w.get("step_ms"):
        ratio = w["step_ms"] / v["step_ms"]
        out.append(("ViT-B/16 b128 bf16: revwire step ≤ 1.30× vanilla", f"{ratio:.2f}×",
                    "met" if ratio <= 1.30 else "NOT met"))
    else:
        out.append(("ViT-B/16 b128 bf16: revwire step ≤ 1.30× vanilla", "-", "pending"))
    fit = {r["method"]: r["max_fit"] for r in cuda
           if r.get("model") == "swin3d_t" and r.get("dtype") == "bfloat16" and r.get("max_fit") is not None}
    name = "swin3d_t 224² bf16: max frames ≥ 4× vanilla and ≥ 1.5× checkpoint"
    if fit.get("vanilla") and fit.get("revwire") is not None:
        a = fit["revwire"] / fit["vanilla"]
        b = fit["revwire"] / fit["checkpoint"] if fit.get("checkpoint") else None
        ok = a >= 4 and (b is None or b >= 1.5)
        out.append((name, f"{fit['revwire']} frames: {a:.2f}× vanilla"
                    + (f", {b:.2f}× checkpoint" if b is not None else ""), "met" if ok else "NOT met"))
    else:
        out.append((name, "-", "pending"))
    name = "depth 12→48: revwire activation memory (saved bytes, bf16) within 10%"
    depth = {r["depth"]: r["saved_bytes"] for r in cuda
             if r.get("suite") == "depth" and r.get("method") == "revwire" and r.get("dtype") == "bfloat16"
             and r.get("saved_bytes") and r.get("depth") in (12, 24, 48)}
    if 12 in depth and 48 in depth:
        spread = max(depth.values()) / min(depth.values()) - 1
        out.append((name, f"+{spread * 100:.1f}% ({', '.join(f'd{d}: {_mib(b)} MiB' for d, b in sorted(depth.items()))})",
                    "met" if spread <= 0.10 else "NOT met"))
    else:
        out.append((name, "-", "pending"))
    return out


def markdown(records: Sequence[Dict], title: str = "revwire benchmarks") -> str:
    records = list(records)
    devices = sorted({r.get("device") for r in records if r.get("device")})
    torches = sorted({r.get("torch") for r in records if r.get("torch")})
    dates = sorted(r.get("date") for r in records if r.get("date"))
    parts = [f"# {title}", "",
             f"Device: {', '.join(devices) or '-'}; torch {', '.join(torches) or '-'}; "
             f"{dates[0][:10] if dates else '-'} .. {dates[-1][:10] if dates else '-'}. "
             "One training step = forward, cross-entropy, backward, AdamW step. "
             "*peak* = `torch.cuda.max_memory_allocated` over a step (parameters, gradients and "
             "optimizer state included); *saved* = bytes autograd keeps for backward during the "
             "forward (parameters excluded; a checkpointed block's kept input counted); "
             "*step* = median step time. Ratios are against vanilla. Note that revwire's "
             "rewired model is a different function from the original after its first block "
             "(DESIGN.md §2): it is fine-tuned, not a drop-in replacement.", ""]
    threads = sorted({r["threads"] for r in records if r.get("threads")})
    if threads:
        parts += [f"CPU step times: {', '.join(map(str, threads))} thread(s), median of "
                  f"{max((r.get('repeats') or 0) for r in records)} steps; on a shared machine they are "
                  "indicative only (memory figures are exact).", ""]
    for suite in ("image", "video", "depth"):
        table = suite_table(records, suite)
        if table:
            parts += [f"## {suite}", "", table, ""]
    fit = max_fit_table(records)
    if fit:
        parts += ["## Largest batch / frame count that fits", "",
                  "`+`: the search limit itself fits.", "", fit, ""]
    rows = targets(records)
    parts += ["## Issue 5 targets (GPU, bf16)", "", "| target | measured | status |", "|---|---|---|"]
    parts += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if all(c == "pending" for _, _, c in rows):
        parts += ["", "GPU figures are pending: these results hold no CUDA measurement."]
    return "\n".join(parts) + "\n"


def _series(records, suite: str, x_key: str):
    """{method: [(x, bytes)]} for `suite`, preferring bf16 peak memory, else saved bytes."""
    rows = [r for r in records if r.get("suite") == suite and r.get("max_fit") is None and not r.get("error")]
    if not rows:
        return None, None
    dtypes = {r["dtype"] for r in rows}
    dtype = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
    rows = [r for r in rows if r["dtype"] == dtype]
    metric = "peak_mem_bytes" if any(r.get("peak_mem_bytes") for r in rows) else "saved_bytes"
    models = {r["model"] for r in rows}
    if suite == "video" and len(models) > 1:
        rows = [r for r in rows if r["model"] == sorted(models)[0]]
    series: Dict[str, List] = {}
    for r in rows:
        if r.get(x_key) is not None and r.get(metric) is not None:
            series.setdefault(r["method"], []).append((r[x_key], r[metric]))
    for v in series.values():
        v.sort()
    return series, f"{'peak' if metric == 'peak_mem_bytes' else 'saved'} MiB ({DTYPE_SHORT.get(dtype, dtype)})"


def plot(records: Sequence[Dict], path: str) -> bool:
    """Write the PNG; False (with a note on stderr) when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: skipped the plot {path} "
              f"(pip install matplotlib, or the 'bench' extra if the project adds one)", file=sys.stderr)
        return False
    panels = [("video", "frames", "memory vs frames (swin3d_t)"), ("depth", "depth", "memory vs depth (ViT-B width)")]
    data = [(s, x, t, *_series(records, s, x)) for s, x, t in panels]
    data = [d for d in data if d[3]]
    if not data:
        print(f"note: nothing to plot for {path}", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4.2), squeeze=False)
    for ax, (suite, x_key, title, series, ylabel) in zip(axes[0], data):
        for m in METHODS:
            if m in series:
                xs, ys = zip(*series[m])
                ax.plot(xs, [y / 2**20 for y in ys], marker="o", label=m)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if x_key == "frames":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
