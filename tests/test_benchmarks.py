"""The benchmark harness (benchmarks/): records, method equivalence, max-fit search, outputs."""
import argparse
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import revwire  # noqa: E402
from benchmarks import measure, methods, plot, run, suites  # noqa: E402
from revwire.tools.twins import Checkpointed  # noqa: E402


# ---------------------------------------------------------------- tiny models


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


class Bottle(nn.Module):
    """relu(x + F(x)) with BatchNorm; a projection shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return F.relu(skip + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(Bottle(8, 8), Bottle(8, 8), Bottle(8, 8))
        self.layer2 = nn.Sequential(Bottle(8, 16, 2), Bottle(16, 16), Bottle(16, 16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def tiny_case(name="tiny_vit", build=tiny_vit, sizes=(2, 3), suite="image", depth=3):
    return suites.Case(suite, name, build, "batch", list(sizes), lambda b: (b, 3, 32, 32), 5, depth=depth,
                       max_fit={"start": 2, "limit": 8, "granularity": 2})


def tiny_args(**kw):
    a = argparse.Namespace(methods=list(methods.METHODS), dtype=["float32"], warmup=1, repeats=2,
                           max_fit=False, max_fit_dtype=["float32"], max_fit_limit=None, seed=0, size=None,
                           sizes="quick")
    vars(a).update(kw)
    return a


# ---------------------------------------------------------------- max-fit search


@pytest.mark.parametrize("true_max", [0, 1, 2, 3, 7, 8, 16, 17, 31, 64, 100, 127, 128, 129, 1000])
@pytest.mark.parametrize("start,limit,gran", [(1, 128, 1), (8, 128, 1), (16, 128, 16), (4, 100, 4)])
def test_max_fit_finds_largest(true_max, start, limit, gran):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= true_max

    n, capped = measure.max_fit(fits, start, limit, gran)
    expect = min(true_max, limit) // gran * gran
    assert n == expect
    assert capped == (true_max >= limit // gran * gran)
    assert all(c % gran == 0 and 0 < c <= limit for c in calls)
    assert len(calls) == len(set(calls)), "a size was tried twice"
    assert len(calls) <= 2 * (limit // gran).bit_length() + 2


def test_max_fit_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure.max_fit(lambda n: True, 0, 10, 1)
    with pytest.raises(ValueError):
        measure.max_fit(lambda n: True, 4, 2, 1)


def test_fits_once_catches_oom_and_releases(monkeypatch):
    torch.manual_seed(0)
    model = tiny_vit().train()
    real = measure.train_step

    def step(model_, opt, x, target, amp):
        if x.shape[0] > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model_, opt, x, target, amp)

    monkeypatch.setattr(measure, "train_step", step)
    case = tiny_case()
    fits = measure.fits_once(model, lambda n: suites.make_batch(case, n, "cpu"), None, torch.device("cpu"))
    assert measure.max_fit(fits, 2, 64, 2) == (6, False)
    assert all(p.grad is None for p in model.parameters())

    def broken(*a):
        raise ValueError("not an OOM")

    monkeypatch.setattr(measure, "train_step", broken)
    with pytest.raises(ValueError):
        fits(2)


# ---------------------------------------------------------------- methods


def test_checkpoint_targets_and_sharing():
    torch.manual_seed(0)
    model = TinyResNet().train()
    x = torch.randn(2, 3, 16, 16)
    mods, info = methods.prepare(model, x[:1])
    # Every bottleneck is checkpointed, the projection-shortcut ones (not in a chain) included.
    rev = mods["revwire"]
    assert methods.checkpoint_targets(model, rev) == [f"layer{i}.{j}" for i in (1, 2) for j in range(3)]
    assert info["checkpointed"] == 6
    ck = mods["checkpoint"]
    assert isinstance(ck.layer1[0], Checkpointed) and isinstance(ck.layer2[2], Checkpointed)
    assert not isinstance(model.layer1[0], Checkpointed), "the original model was modified"
    ids = {id(p) for p in model.parameters()}
    for m in mods.values():
        assert {id(p) for p in m.parameters()} == ids


def test_vit_targets_are_the_blocks():
    model = tiny_vit().train()
    rev = revwire.rewire(model, torch.randn(1, 3, 32, 32))
    assert methods.checkpoint_targets(model, rev) == ["blocks.0", "blocks.1", "blocks.2"]


def _loss_and_grads(module, model, x, target, amp=None):
    model.zero_grad(set_to_none=True)
    loss = measure.loss_of(module, x, target, amp)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("build", [tiny_vit, TinyResNet], ids=["vit", "resnet"])
def test_methods_give_same_loss(build):
    """vanilla == checkpoint (same function); revwire's reversible engine == the same rewired
    graph under plain autograd (the rewired function differs from the original after its
    first block, docs/design.md §2, so it is compared with its own ground truth)."""
    torch.manual_seed(0)
    model = build().double().train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 3, 4])
    mods, _ = methods.prepare(model, x[:1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name, module in [("vanilla", mods["vanilla"]), ("checkpoint", mods["checkpoint"]),
                         ("revwire", mods["revwire"]), ("revwire-autograd", mods["revwire"])]:
        revwire.set_engine(mods["revwire"], "autograd" if name == "revwire-autograd" else "reversible")
        model.load_state_dict(state)
        results[name] = _loss_and_grads(module, model, x, target)
    revwire.set_engine(mods["revwire"], "reversible")

    def close(a, b, tol):
        (la, ga), (lb, gb) = a, b
        assert torch.allclose(la, lb, rtol=tol, atol=0)
        assert ga.keys() == gb.keys()
        for k in ga:
            assert torch.allclose(ga[k], gb[k], rtol=tol, atol=1e-12), k

    close(results["checkpoint"], results["vanilla"], 1e-10)
    close(results["revwire"], results["revwire-autograd"], 1e-7)
    assert not torch.allclose(results["revwire"][0], results["vanilla"][0]), "revwire did not rewire"


class _CountSDPA(torch.overrides.TorchFunctionMode):
    n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def test_sdpa_methods_compute_their_originals():
    """The `_sdpa` methods: vanilla_sdpa == checkpoint_sdpa == vanilla (the same function),
    revwire_sdpa == revwire, all sharing the model's parameters, the model left unchanged."""
    swin = pytest.importorskip("torchvision.models.video.swin_transformer")
    torch.manual_seed(0)
    model = swin.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 3, 3],
                                   stochastic_depth_prob=0.0, num_classes=5).double().train()
    x = torch.randn(2, 3, 8, 24, 24, dtype=torch.float64)
    target = torch.tensor([0, 3])
    mods, info = methods.prepare(model, x[:1], methods.ALL_METHODS)
    assert info["attention_sites"] == 2
    assert all(type(m.attn).forward is swin.ShiftedWindowAttention3d.forward and "forward" not in vars(m.attn)
               for m in model.features[0]), "the original model was modified"
    ids = {id(p) for p in model.parameters()}
    results = {}
    for name in methods.ALL_METHODS:
        assert {id(p) for p in mods[name].parameters()} == ids, name
        results[name] = _loss_and_grads(mods[name], model, x, target)
    for name in methods.ALL_METHODS:
        with torch.no_grad(), _CountSDPA() as calls:
            mods[name](x)
        assert calls.n == (2 if name.endswith("_sdpa") else 0), name
    for sdpa, plain in [("vanilla_sdpa", "vanilla"), ("checkpoint_sdpa", "vanilla"), ("revwire_sdpa", "revwire")]:
        (la, ga), (lb, gb) = results[sdpa], results[plain]
        assert torch.allclose(la, lb, rtol=1e-12, atol=0), sdpa
        assert ga.keys() == gb.keys()
        for k in ga:
            assert torch.allclose(ga[k], gb[k], rtol=1e-10, atol=1e-12), (sdpa, k)


def test_step_memory_record():
    """The meter's record of one step: the model state by hand, activations below vanilla's
    for checkpoint, and nothing the step leaves behind."""
    torch.manual_seed(0)
    model = tiny_vit().train()
    x, t = suites.make_batch(tiny_case(), 8, "cpu")
    mods, _ = methods.prepare(model, x[:1])
    params = list(model.parameters())
    P = sum(p.numel() * 4 for p in params)
    recs = {}
    for m, mod in mods.items():
        opt = measure.make_optimizer(mod)
        recs[m] = measure.step_memory(mod, opt, x, t, None)
        model.zero_grad(set_to_none=True)
    for m, r in recs.items():
        # parameters, gradients, AdamW's moments and 0-dim steps, the batch (x and int64 targets)
        assert r["base_mem_bytes"] == 4 * P + 4 * len(params) + x.numel() * 4 + t.numel() * 8, m
        assert r["step_peak_bytes"] == r["base_mem_bytes"] + r["act_peak_bytes"]
        assert 0 < r["fwbw_act_peak_bytes"] <= r["act_peak_bytes"]
        assert r["act_peak_bytes"] == max(r["phase_act_peaks"].values())
        assert r["peak_at"].split(":")[0] in ("forward", "backward", "optimizer")
        assert r["at_peak"] and all(row["phase"] != "baseline" for row in r["at_peak"])
        assert "cuda_peak_bytes" not in r
    assert recs["checkpoint"]["fwbw_act_peak_bytes"] < recs["vanilla"]["fwbw_act_peak_bytes"]


# ---------------------------------------------------------------- records and outputs


def _check_record(r):
    for k in run.KEYS:
        assert k in r, k
    assert isinstance(r["model"], str) and r["method"] in methods.METHODS
    assert r["dtype"] in ("float32", "bfloat16") and isinstance(r["device"], str)
    assert isinstance(r["torch"], str) and isinstance(r["date"], str)
    for k in ("batch", "frames", "step_peak_bytes", "act_peak_bytes", "max_fit"):
        assert r[k] is None or (isinstance(r[k], int) and not isinstance(r[k], bool)), k
    assert r["step_ms"] is None or isinstance(r["step_ms"], float)
    assert r["input"] is None or isinstance(r["input"], str)


def test_run_case_records():
    case = tiny_case(sizes=(3, 8))
    progress = run.Progress(3, stream=open(os.devnull, "w"))
    records = run.run_case(case, torch.device("cpu"), tiny_args(size=[8]), progress)
    assert len(records) == 3 and progress.done == 3  # --size 8: only that size
    for r in records:
        _check_record(r)
        assert r["step_ms"] > 0 and r["act_peak_bytes"] > 0
        assert r["step_peak_bytes"] == r["base_mem_bytes"] + r["act_peak_bytes"]
        assert r["input"] == "8x3x32x32" and r["frames"] is None and r["max_fit"] is None
    base = {r["base_mem_bytes"] for r in records}
    assert len(base) == 1, "the three methods share one model state"
    by = {r["method"]: r["fwbw_act_peak_bytes"] for r in records}
    assert by["checkpoint"] < by["vanilla"]


def test_main_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    picked = [tiny_case(), tiny_case("tiny_deep", sizes=(2,), suite="depth")]
    monkeypatch.setattr(run, "cases", lambda profile, s, m: [c for c in picked if c.suite in s])
    argv = ["--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--warmup", "0", "--repeats", "1",
            "--machine", "a test"]
    assert run.main(argv) == 0
    data = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert isinstance(data, list) and len(data) == 9
    for r in data:
        _check_record(r)
        assert r["machine"] == "a test" and r["sizes"] == "quick" and "--quick" in r["command"]
    md = (tmp_path / "cpu-quick.md").read_text()
    assert "## image" in md and "## depth" in md and "| tiny_vit | 2x3x32x32 | fp32 |" in md
    assert "pending" in md and "a test" in md and "--quick" in md
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "cpu-quick.png").exists()
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().err
    # A second run of one suite merges: its records replace the old ones, the rest stay.
    assert run.main(argv + ["--suite", "depth", "--no-plot"]) == 0
    again = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert len(again) == 9
    assert sum(r["model"] == "tiny_deep" for r in again) == 3


def _rec(method, **kw):
    r = {k: None for k in run.KEYS}
    r.update(method=method, dtype="float32", torch="2.14.1", date="2026-01-01T00:00:00", device="cpu")
    r.update(kw)
    return r


def test_markdown_targets():
    mib, gib = 2**20, 2**30
    records = []
    # transformer: revwire at 0.5x checkpoint at 12 layers (met), 0.5x at 24 (NOT met: <= 0.4x),
    # flat from 6 to 24 layers (+5%: met), step time 1.2x checkpoint (NOT met)
    for n, (ck, rv, fb) in {6: (30, 19, 20), 12: (40, 20, 20), 24: (60, 30, 21)}.items():
        for m, act in (("vanilla", 100), ("checkpoint", ck), ("revwire", rv)):
            records.append(_rec(m, model=f"prenorm_l{n}", suite="transformer", depth=n, batch=8, input="8x128x256",
                                act_peak_bytes=act * mib, fwbw_act_peak_bytes=(fb if m == "revwire" else act) * mib,
                                step_peak_bytes=(act + 50) * mib, step_ms={"checkpoint": 10.0}.get(m, 12.0)))
    # GPU ViT-B b128: revwire 0.20x vanilla and below checkpoint; 1.4x vanilla's time
    for m, peak, ms in (("vanilla", 40, 300.0), ("checkpoint", 12, 390.0), ("revwire", 8, 420.0)):
        records.append(_rec(m, model="vit_base_patch16_224", suite="image", device="NVIDIA H100", dtype="bfloat16",
                            batch=128, input="128x3x224x224", step_peak_bytes=peak * gib, step_ms=ms))
    for m, fit in (("vanilla", 64), ("checkpoint", 256), ("revwire", 512)):
        records.append(_rec(m, model="swin3d_t", suite="video", axis="frames", device="NVIDIA H100",
                            dtype="bfloat16", max_fit=fit))
    rows = {a: (b, c) for a, b, c in plot.targets(records)}
    status = {a.split(":")[0] + a[a.index(":"):][:30]: c for a, (b, c) in rows.items()}
    got = [c for _, c in rows.values()]
    assert got == ["met", "NOT met", "met", "NOT met", "pending", "pending", "pending", "pending", "pending",
                   "met", "NOT met", "met", "pending"], status
    md = plot.markdown(records)
    assert "0.50× (20.0 vs 40.0 MiB, 8x128x256)" in md and "512 (8.00×)" in md
    assert "+5.0%" in md and "GPU figures are pending" not in md
    # a step peak in the optimizer is marked
    records.append(_rec("vanilla", model="m", suite="image", batch=2, input="2x3x8x8", act_peak_bytes=mib,
                        step_peak_bytes=2 * mib, peak_at="optimizer:div"))
    assert "1.0†" in plot.markdown(records)


def test_profiles():
    for case in suites.cases("quick"):
        for s in case.sizes:
            assert torch.Size(case.input_shape(s)).numel() <= 3 * 8 * 64 * 64
    names = {c.name for c in suites.cases("gpu")}
    assert {"vit_base_patch16_224", "resnet50", "swin_tiny_patch4_window7_224", "swin3d_t", "resnet18",
            "r3d_18", "prenorm_l12"} <= names
    assert [c.sizes for c in suites.cases("gpu", ["video"], ["swin3d"])] == [[16, 32, 64, 128, 256, 512, 1024]]
    assert [c.depth for c in suites.cases("gpu", ["depth"])] == [6, 12, 24, 48]
    # CPU sizes keep the GPU cases' proportions (issue 10): 224², a few frames or samples
    cpu = {c.name: c for c in suites.cases("cpu")}
    assert cpu["swin3d_t"].sizes == [8, 16] and cpu["swin3d_t"].input_shape(8) == (1, 3, 8, 224, 224)
    assert cpu["vit_base_patch16_224"].input_shape(4) == (4, 3, 224, 224)
    assert [c.depth for c in suites.cases("cpu", ["depth"])] == [12, 24]
    assert [c.depth for c in suites.cases("cpu", ["transformer"])] == [1, 2, 6, 12, 24]
    assert cpu["prenorm_l12"].input_shape(8) == (8, 128, 256)
    with pytest.raises(ValueError, match="profile"):
        suites.cases("huge")


def test_prenorm_transformer_blocks_are_checkpointed_one_by_one():
    model = suites.PreNormTransformer(3, dim=16, heads=2).train()
    x = torch.randn(2, 5, 16)
    mods, info = methods.prepare(model, x[:1])
    assert info["chains"] == [6] and info["checkpointed"] == 6
    assert mods["checkpoint"](x).shape == (2, 10)


def test_gpu_script_dry_run(tmp_path):
    """`benchmarks/gpu.sh --dry-run`: the GPU run's three commands at tiny sizes on the CPU."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu.sh"), "--dry-run", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    for r in data:
        _check_record(r)
    got = {(r["model"], r["method"], "fit" if r["max_fit"] is not None else "step") for r in data}
    want = {(m, meth, kind) for m, kind in (("vit_base_patch16_224", "step"), ("swin3d_t", "fit"),
                                            ("vit_b_depth2", "step"), ("vit_b_depth4", "step"))
            for meth in methods.METHODS}
    assert got == want
    assert all(r["dtype"] == "bfloat16" for r in data)
    md = (tmp_path / "gpu-dry-run.md").read_text()
    assert "## Largest batch / frame count that fits" in md and "## depth" in md
    bad = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu.sh"), "--bogus"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
