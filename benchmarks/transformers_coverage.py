"""How much of Hugging Face transformers' vision and video models revwire rewires exactly.

Models: every model type of transformers' image- and video-classification auto mappings
(`MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`, `MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES`),
the `...ForImageClassification` / `...ForVideoClassification` class (the first one where the
mapping names several), built from its default config shrunk (widths 32, <= 4 layers, stage
depths <= 3, 64x64 images, 4 frames; a less shrunk config, then the default one, where a
smaller one does not build or run), random weights, float64, batch 2, train mode. Each
model runs in its own subprocess with a time limit. Per model it records:

- `capture`: the front end that captured it (`symbolic` torch.fx, or `concrete`: shape
  control flow read from the example inputs), or the TraceError;
- `candidates`: same-shape adds where one operand is computed from the other (counted on
  the captured graph, independently of revwire's matcher), and how many of them are
  post-norm (`LayerNorm(x + F(x))`: the add's only reader is a normalisation, BERT-style;
  such a block is not x + F(x) and is not rewired);
- chains and blocks rewired, the engine check (reversible vs autograd on the rewired
  model, same seed: outputs and input / parameter gradients within rel 1e-6, a
  parameter's error relative to its gradient norm floored at 1e-6 of the largest), the
  bytes autograd saves in one training forward (original vs rewired), and timings.

    OMP_NUM_THREADS=1 python benchmarks/transformers_coverage.py          # run / resume, summarize
    python benchmarks/transformers_coverage.py --summarize                # summary only
    python benchmarks/transformers_coverage.py --only vit swin            # just these, printed
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CSV_PATH = RESULTS / "transformers_coverage.csv"
MD_PATH = RESULTS / "transformers_coverage.md"
FIELDS = ["model_type", "cls", "task", "config", "params_m", "input", "capture", "candidates", "post_norm",
          "mode_leaves",
          "chains", "blocks", "chain_lengths", "engine_check", "out_rel", "grad_rel", "saved_ratio",
          "status", "category", "error", "rewire_s", "seconds"]
TOL = 1e-6
MAX_PARAMS_M = 100.0
MEM_LIMIT = 10 * 2**30
SKIP = {"shieldgemma2": "a vision-language model (Gemma 3 inside): not a vision backbone"}
# why the rest are not rewired, as measured here (see the per-model rows)
NOTES = {
    "dinat": "needs the `natten` package (neighbourhood-attention kernels), which is not installed here: "
             "transformers raises ImportError when building it",
    "perceiver": "272M parameters even shrunk: Perceiver's widths are `d_latents` / `d_model`, which the "
                 "shrinking does not know; over the 100M limit",
    "siglip2": "takes pre-patchified pixels with `pixel_attention_mask` and `spatial_shapes`; the script "
               "gives every model an image tensor",
    "levit": "LeViT's residual layer draws its stochastic depth inline (`if self.training and self.drop_rate "
             "> 0: rnd = torch.rand(...)`), so the leaf rule keeps each block whole (correctly: traced, the "
             "mode would be frozen); no residual add is left outside",
    "timm_wrapper": "the wrapped timm ResNet's forward reads `self.training` (F.dropout in forward_head), so "
                    "it is a leaf; `not_leaf=[type(model.timm_model)]` rewires it (2 3 5 2, checked by hand)",
    "timesformer": "divided space-time attention adds its temporal residual to a slice of the tokens "
                   "(`hidden_states[:, 1:, :] + residual`) and the spatial one after a `torch.cat` with the "
                   "class token: not x + F(x) on one stream",
    "mobilenet_v1": "no residual connections", "pp_lcnet": "no residual connections",
    "textnet": "RepVGG-style parallel branches (conv + vertical conv + horizontal conv + BatchNorm(x)): no "
               "identity skip, so no x + F(x)",
}


def model_types():
    import transformers.models.auto.modeling_auto as ma
    rows = []
    for task, mapping in (("image", ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
                          ("video", ma.MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES)):
        for model_type, names in mapping.items():
            rows.append((model_type, names[0] if isinstance(names, (tuple, list)) else names, task))
    return rows


# -- configs --------------------------------------------------------------------------------

def _shrink(config, level: int) -> None:
    """level 2: small widths, depths and images; level 1: depths and widths only."""
    def setint(name, value):
        if isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool):
            setattr(config, name, value)
    for sub in ("vision_config", "text_config", "backbone_config"):
        if getattr(config, sub, None) is not None and hasattr(getattr(config, sub), "to_dict"):
            _shrink(getattr(config, sub), level)
    if getattr(config, "use_cache", None) is True:  # a KV cache is state: not trained through
        config.use_cache = False
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int):
        config.num_hidden_layers = min(layers, 4)
    depths = getattr(config, "depths", None)
    if isinstance(depths, (list, tuple)) and all(isinstance(d, int) for d in depths):
        config.depths = [min(d, 3) for d in depths]
    if isinstance(getattr(config, "hidden_size", None), int) and getattr(config, "num_attention_heads", None):
        setint("hidden_size", 32)
        setint("num_attention_heads", 2)
        if isinstance(getattr(config, "num_key_value_heads", None), int):
            config.num_key_value_heads = 2
        setint("intermediate_size", 64)
    hs = getattr(config, "hidden_sizes", None)
    if isinstance(hs, (list, tuple)) and all(isinstance(h, int) for h in hs):
        config.hidden_sizes = [8 * 2 ** i for i in range(len(hs))]
    if isinstance(getattr(config, "embed_dim", None), int) and isinstance(getattr(config, "num_heads", None), (list, tuple)):
        config.embed_dim = 16
        config.num_heads = [2 ** i for i in range(len(config.num_heads))]
    if level >= 2:
        size = getattr(config, "image_size", None)
        if isinstance(size, int) and size > 64:
            config.image_size = 64
        elif isinstance(size, (list, tuple)) and len(size) == 2 and max(size) > 64:
            config.image_size = [64, 64]
        frames = getattr(config, "num_frames", None)
        if isinstance(frames, int) and frames > 4:
            config.num_frames = 4


def _input(config, task, torch, model=None):
    vision = getattr(config, "vision_config", None) or config
    if model is not None:
        import inspect
        first = next(iter(inspect.signature(model.forward).parameters), None)
        if first == "input_ids":  # ImageGPT: pixels as colour-cluster ids
            g = torch.Generator().manual_seed(0)
            n = min(int(getattr(config, "n_positions", 64)), 64)
            return torch.randint(0, int(config.vocab_size) - 1, (2, n), generator=g)
    size = getattr(vision, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    c = getattr(vision, "num_channels", 3)
    frames = getattr(vision, "num_frames", None)
    g = torch.Generator().manual_seed(0)
    if task == "video" or frames:
        return torch.randn(2, frames or 8, c, h, w, generator=g, dtype=torch.float64)
    return torch.randn(2, c, h, w, generator=g, dtype=torch.float64)


# -- one model ----------------------------------------------------------------------------

def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _loss(out, torch, pytree):
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            total = total + (t * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
    return total


def _step(model, engine, x, state, torch, pytree, revwire):
    revwire.set_engine(model, engine)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(0)
    out = model(xx)
    _loss(out, torch, pytree).backward()
    outs = [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, xx.grad, grads


def _candidates(gm, fx):
    """(residual-looking adds, of which post-norm): same-shape adds, one operand computed
    from the other; post-norm when the add's only reader is a normalisation."""
    import operator
    import torch
    from revwire.compiler.shapes import info
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    nodes = list(gm.graph.nodes)
    from benchmarks.coverage import reaches  # the repository's root is on sys.path (main)
    order = {n: i for i, n in enumerate(nodes)}
    total = post = 0
    for n in nodes:
        if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add) and len(n.args) == 2:
            a, b = n.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            if not (info(a).is_tensor and info(b).is_tensor and info(a).shape == info(b).shape == info(n).shape):
                continue
            if reaches(a, b, order) or reaches(b, a, order):
                total += 1
                users = list(n.users)
                if len(users) == 1 and users[0].op == "call_module" and isinstance(
                        gm.get_submodule(users[0].target), norms):
                    post += 1
    return total, post


def run_one(model_type, cls_name, task, out_q) -> None:
    row = {k: "" for k in FIELDS}
    row.update(model_type=model_type, cls=cls_name, task=task)
    t0 = time.time()
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    except Exception:
        pass
    try:
        warnings.filterwarnings("ignore")
        import torch
        import torch.utils._pytree as pytree
        from torch import fx
        torch.set_num_threads(1)
        import transformers
        import revwire
        from revwire.compiler.trace import bind_inputs, trace
        from revwire.compiler.shapes import propagate
        from revwire.runtime.meter import model_saved_bytes
        transformers.logging.set_verbosity_error()
        cls = getattr(transformers, cls_name)
        model = x = None
        errors = []
        for level in (2, 1, 0):
            try:
                config = transformers.AutoConfig.for_model(model_type)
                if level:
                    _shrink(config, level)
                torch.manual_seed(0)
                with torch.device("meta"):
                    params = sum(p.numel() for p in cls(config).parameters()) / 1e6
                if params > MAX_PARAMS_M:
                    errors.append(f"level {level}: {params:.0f}M params")
                    continue
                torch.manual_seed(0)
                model = cls(config).double().train()
                x = _input(config, task, torch, model)
                with torch.no_grad():
                    model(x)
                row.update(config=["default", "widths/depths", "small"][level], params_m=f"{params:.2f}",
                           input="x".join(map(str, x.shape)))
                break
            except Exception as e:
                errors.append(f"level {level}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
                model = None
        if model is None:
            raise RuntimeError("build/run failed: " + " | ".join(errors))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # re-draw constant-initialised parameters (zero-init heads, gammas)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        gm = trace(model, bind_inputs(model, (x,)))
        propagate(gm, (x,))
        row["capture"] = gm.meta["revwire_capture"]
        row["candidates"], row["post_norm"] = _candidates(gm, fx)
        from revwire.compiler.trace import reads_training_flag
        row["mode_leaves"] = sum(  # leaves kept whole because their forward reads self.training
            1 for n in gm.graph.nodes if n.op == "call_module"
            and not type(gm.get_submodule(n.target)).__module__.startswith("torch.nn")
            and reads_training_flag(type(gm.get_submodule(n.target))))
        t1 = time.time()
        rev = revwire.rewire(model, x, strict=False)
        row["rewire_s"] = f"{time.time() - t1:.2f}"
        if rev is model:
            rep = None
        else:
            rep = revwire.report(rev)
        if rep is None or not rep.chains:
            row.update(status="no chain", chains=0, blocks=0)
        else:
            row.update(chains=len(rep.chains), blocks=rep.num_blocks,
                       chain_lengths=" ".join(str(c.num_blocks) for c in rep.chains))
            state = {k: v.clone() for k, v in model.state_dict().items()}
            ao, ax, ag = _step(rev, "autograd", x, state, torch, pytree, revwire)
            ro, rx, rg = _step(rev, "reversible", x, state, torch, pytree, revwire)
            rev.load_state_dict(state)
            out_rel = max(_rel(a, b) for a, b in zip(ro, ao))
            floor = 1e-6 * max(v.norm().item() for v in ag.values())
            grad_rel = max([_rel(rx, ax) if ax is not None else 0.0] + [((rg[k] - v).norm() / max(v.norm().item(), floor)).item()
                                              for k, v in ag.items()])
            ok = out_rel <= TOL and grad_rel <= TOL and rg.keys() == ag.keys()
            row.update(out_rel=f"{out_rel:.1e}", grad_rel=f"{grad_rel:.1e}", engine_check="pass" if ok else "FAIL")
            try:
                orig = model_saved_bytes(model.train(), x)
                new = model_saved_bytes(rev.train(), x)
                row["saved_ratio"] = f"{new / orig:.2f}"
            except Exception as e:
                row["saved_ratio"] = f"error {type(e).__name__}"
            row["status"] = "ok" if ok else "engine mismatch"
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e)}".replace("\n", " ")
        row["error"] = msg[:600]
        row["status"] = "trace failed" if ("could not trace" in msg or "could not capture" in msg) else "error"
        if os.environ.get("REVWIRE_COVERAGE_DEBUG"):
            traceback.print_exc()
    row["category"] = _category(row)
    row["seconds"] = f"{time.time() - t0:.1f}"
    out_q.put(row)


def _category(row) -> str:
    s = row["status"]
    if s == "ok":
        return "rewired, engine check passes"
    if s == "engine mismatch":
        return "rewired, engine check FAILS"
    if s == "trace failed":
        return "not captured"
    if s == "no chain":
        cand, post = int(row["candidates"] or 0), int(row["post_norm"] or 0)
        if cand and post * 2 >= cand:
            return "post-norm blocks LayerNorm(x + F(x)) (not x + F(x))"
        if cand < 2 and int(row.get("mode_leaves") or 0):
            return "residual blocks inside modules kept whole (their forward reads self.training)"
        if cand < 2:
            return "no residual chain in the architecture"
        return "no chain although >= 2 residual-looking adds"
    return "build or run failed"


def run_in_subprocess(model_type, cls_name, task, timeout):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=run_one, args=(model_type, cls_name, task, q))
    t0 = time.time()
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        row = {k: "" for k in FIELDS}
        row.update(model_type=model_type, cls=cls_name, task=task, status="timeout",
                   category="build or run failed", error=f"timed out after {timeout}s", seconds=f"{time.time() - t0:.0f}")
        return row
    try:
        return q.get(timeout=5)
    except Exception:
        row = {k: "" for k in FIELDS}
        row.update(model_type=model_type, cls=cls_name, task=task, status="error", category="build or run failed",
                   error=f"subprocess died (exit {p.exitcode})", seconds=f"{time.time() - t0:.0f}")
        return row


# -- summary ------------------------------------------------------------------------------

def read_rows():
    if not CSV_PATH.exists():
        return []
    with open(CSV_PATH) as f:
        return list(csv.DictReader(f))


def summarize(total=None):
    import torch
    import transformers
    rows = read_rows()
    def pct(a, b):
        return f"{100 * a / b:.1f}% ({a}/{b})" if b else "n/a"
    skipped = [r for r in rows if r["status"] == "skipped"]
    tried = [r for r in rows if r["status"] != "skipped"]
    built = [r for r in tried if r["category"] != "build or run failed"]
    captured = [r for r in built if r["status"] != "trace failed"]
    ok = [r for r in captured if r["status"] == "ok"]
    post = [r for r in captured if r["category"].startswith("post-norm")]
    nores = [r for r in captured if r["category"] == "no residual chain in the architecture"]
    prenorm = [r for r in built if r not in post and r not in nores]
    symbolic = [r for r in captured if r["capture"] == "symbolic"]
    concrete = [r for r in captured if r["capture"] == "concrete"]
    lines = [
        "# transformers coverage of revwire", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, CPU, random weights, float64, batch 2, train mode",
        "- command: `OMP_NUM_THREADS=1 python benchmarks/transformers_coverage.py` (resumable; rows in "
        "`benchmarks/results/transformers_coverage.csv`)",
        "- models: every model type of transformers' image- and video-classification auto mappings, its "
        "`...For{Image,Video}Classification` class, default config shrunk (see the script)",
        f"- progress: {len(rows)} of {total or len(rows)} model types done", "",
        "| measure | value |", "| --- | --- |",
        f"| model types | {len(rows)} ({len(skipped)} skipped) |",
        f"| built and ran in eager mode | {len(built)} of {len(tried)} |",
        f"| **captured** (a GraphModule calling the model's own modules) | **{pct(len(captured), len(built))}** |",
        f"| ... by symbolic torch.fx / by concrete capture | {len(symbolic)} / {len(concrete)} |",
        f"| post-norm blocks `LayerNorm(x + F(x))` (not x + F(x): not rewired) | {len(post)} |",
        f"| no residual chain in the architecture (< 2 residual-looking adds) | {len(nores)} |",
        f"| **pre-norm residual models rewired, engine check passing** | **{pct(len(ok), len(prenorm))}** |",
        f"| all built models rewired, engine check passing | {pct(len(ok), len(built))} |",
        "",
        "The engine check compares the reversible engine with the autograd engine on the rewired model "
        f"(same seed, float64): outputs, input and parameter gradients within rel {TOL:g} (a parameter's error "
        "relative to its gradient norm floored at 1e-6 of the largest). 'Pre-norm residual models' are the built "
        "models other than those with post-norm blocks or without residual chains. Parameters were perturbed "
        "after init (zero-initialised heads and layer scales would make gradient checks vacuous).", "",
        "## Per model", "",
        "| model type | class | config | input | capture | chains | engine check (out / grad rel) | saved bytes rewired/original | rewire s | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        check = f"{r['engine_check']} ({r['out_rel']} / {r['grad_rel']})" if r["engine_check"] else ""
        result = r["category"] + (f": {r['error'][:220]}" if r["error"] else "")
        lines.append(f"| {r['model_type']} | {r['cls']} | {r['config']} | {r['input']} | {r['capture']} | "
                     f"{r['chain_lengths'] or r['chains']} | {check} | {r['saved_ratio']} | {r['rewire_s']} | "
                     f"{result.replace('|', '/')} |")
    notes = [(mt, text) for mt, text in NOTES.items() if any(r["model_type"] == mt and r["status"] != "ok" for r in rows)]
    if notes:
        lines += ["", "## Why the rest are not rewired", ""]
        lines += [f"- **{mt}**: {text}" for mt, text in notes]
    MD_PATH.write_text("\n".join(lines) + "\n")
    return "\n".join(lines[:22])


def _append(row):
    from benchmarks.coverage import append_row  # the repository's root is on sys.path (main)

    append_row(CSV_PATH, FIELDS, row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model")
    ap.add_argument("--only", nargs="*", help="run just these model types (printed, not recorded)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    RESULTS.mkdir(parents=True, exist_ok=True)
    models = model_types()
    if args.summarize:
        print(summarize(len(models)))
        return
    if args.only:
        for mt, cls, task in models:
            if mt in args.only:
                print(json.dumps(run_in_subprocess(mt, cls, task, args.timeout)), flush=True)
        return
    done = {r["model_type"] for r in read_rows()}
    for k, (mt, cls, task) in enumerate(models):
        if mt in done:
            continue
        if mt in SKIP:
            row = {f: "" for f in FIELDS}
            row.update(model_type=mt, cls=cls, task=task, status="skipped", category="skipped", error=SKIP[mt])
        else:
            row = run_in_subprocess(mt, cls, task, args.timeout)
        _append(row)
        print(f"[{k + 1}/{len(models)}] {mt}: {row['status']} capture={row['capture']} chains={row['chain_lengths']} "
              f"check={row['engine_check']} {row['seconds']}s {row['error'][:200]}", flush=True)
    print(summarize(len(models)))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
