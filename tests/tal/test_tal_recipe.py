"""The recipe end to end on the CPU, tiny: every stage for two epochs, then resume and bad input."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import json

import pytest
import torch

import model as model_module
import recipe
from configs import get_config
from test_tal_train import TINY_RUN

CLIPS = ["num_train=12", "num_val=4", "frames=8", "classes=('bounce', 'shake', 'zoom')"]


def argv(tmp_path, *extra):
    a = ["--out", str(tmp_path / "recipe"), "--quiet", "--epochs", "2", "--eval-every", "1",
         "--pretrain-epochs", "2", "--recover-epochs", "2", "--clip-batch", "4",
         "--set", f"data.cache_dir={str(tmp_path / 'cache')!r}", "--set", "data.num_workers=0",
         "--set", "train.backbone_delay_epochs=1.0"]   # the head alone for 1 of the 2 epochs
    for item in TINY_RUN:
        a += ["--set", item]
    for item in CLIPS:
        a += ["--clip-set", item]
    return a + list(extra)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def trainable(state):
    return {k for k, v in state.items() if v.is_floating_point() and "relative_position_index" not in k}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny recipe run shared by the tests below (it is the slow part)."""
    tmp = tmp_path_factory.mktemp("recipe")
    initial = {}
    build = recipe.ClipClassifier

    def spy(*args, **kwargs):   # the weights the pretraining starts from
        m = build(*args, **kwargs)
        initial.setdefault("backbone", {k: v.clone() for k, v in m.backbone.state_dict().items()})
        return m

    recipe.ClipClassifier = spy
    try:
        # the tiny test preset trains with lr 3e-3; the recipe's clip stages take their own
        results = recipe.main(argv(tmp, "--distill"))
    finally:
        recipe.ClipClassifier = build
    return tmp, results, initial["backbone"]


def test_every_stage_learns_and_writes_valid_outputs(finished):
    tmp, res, initial = finished
    out = tmp / "recipe"
    assert list(res) == list(recipe.STAGES)
    for stage in recipe.STAGES:
        assert (out / stage / "done.json").is_file()

    # pretraining: the clip loss falls and every trainable backbone tensor moved
    pre = res["pretrain"]
    assert pre["history"][1]["loss"] < pre["history"][0]["loss"], pre["history"]
    pretrained = load(out / "pretrain" / "backbone.pt")
    assert set(pretrained) == set(initial)
    assert {k for k in trainable(initial) if not torch.equal(initial[k], pretrained[k])} == trainable(initial)

    # recovery: accuracies before / after rewiring / per fine-tune epoch; the rewired weights moved
    rec = res["recover"]
    assert rec["distill"] and len(rec["curve"]) == 3 and rec["curve"][0] == rec["val_acc_rewired"]
    assert all(0.0 <= a <= 1.0 for a in rec["curve"] + [rec["val_acc_original"]])
    assert rec["history"][1]["loss"] < rec["history"][0]["loss"], rec["history"]
    assert "kd" in rec["history"][0] and "reversible stage" in rec["report"]
    recovered = load(out / "recover" / "backbone.pt")
    assert set(recovered) == set(pretrained)   # same keys: the weights move between models
    assert all(not torch.equal(recovered[k], pretrained[k]) for k in trainable(pretrained))

    # localisation: same data and epochs for every method; losses fall; predictions valid
    runs = res["localise"]["runs"]
    assert set(runs) == {"reversible", "frozen", "checkpoint"}
    gt_path = next((tmp / "cache").glob("synthetic-*/annotations.json"))
    gt = json.loads(gt_path.read_text())["database"]
    val = {v for v, e in gt.items() if e["subset"] == "validation"}
    for m, r in runs.items():
        assert r["loss_last"] < r["loss_first"], (m, r)
        assert [e for e, _ in r["curve"]] == [1, 2] and 0.0 <= r["average_mAP"] <= 1.0 and r["step_s"] > 0
        preds = json.loads((out / f"localise_{m}" / "predictions.json").read_text())["results"]
        assert set(preds) == val and sum(map(len, preds.values())) > 0
        for vid, items in preds.items():
            for p in items:
                assert 0.0 <= p["score"] <= 1.0 and 0.0 <= p["segment"][0] <= p["segment"][1] <= gt[vid]["duration"] + 1e-6
        ckpt = load(out / f"localise_{m}" / "last.pt")
        assert ckpt["engine"] == recipe.METHODS[m][0]
        start = recovered if m == "reversible" else pretrained
        final = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        moved = {k for k in trainable(start) if not torch.equal(start[k], final[k])}
        # end to end moves every backbone tensor from the weights it was given; frozen moves none
        assert moved == (set() if m == "frozen" else trainable(start)), m

    # report: the table, the figures and two PNG plots
    rep = res["report"]
    assert set(rep["methods"]) == set(runs)
    assert all(rep["methods"][m]["forward_saved_bytes"] > 0 for m in runs)
    assert rep["methods"]["frozen"]["forward_saved_bytes"] < rep["methods"]["reversible"]["forward_saved_bytes"]
    for m in runs:   # the step peak holds the activation peak, which holds what the forward saved
        r = rep["methods"][m]
        assert r["step_peak_bytes"] > r["activation_peak_bytes"] >= r["forward_saved_bytes"] > 0
    assert rep["methods"]["frozen"]["step_peak_bytes"] < rep["methods"]["reversible"]["step_peak_bytes"]
    assert "reversible_minus_frozen" in rep and "| frozen pretrained features |" in (out / "report" / "table.md").read_text()
    for p in rep["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages(finished, monkeypatch):
    tmp, first, _ = finished
    out = tmp / "recipe"

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    for name in ("stage_data", "stage_pretrain", "stage_recover", "run_method"):
        monkeypatch.setattr(recipe, name, boom)
    (out / "report" / "done.json").unlink()          # only the report is missing
    reports = []
    real = recipe.stage_report
    monkeypatch.setattr(recipe, "stage_report", lambda *a, **k: reports.append(1) or real(*a, **k))
    again = recipe.main(argv(tmp, "--distill"))
    assert reports == [1]
    assert again["localise"] == first["localise"] and again["recover"] == first["recover"]
    assert (out / "report" / "done.json").is_file()
    # the same folder with other settings is refused instead of mixing two runs
    with pytest.raises(SystemExit, match="other settings.*distill"):
        recipe.main(argv(tmp))


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "torchvision:no_such_net"], "unknown torchvision model"),
    (["--backbone", "torchvision:resnet18"], "no sequence adapter"),
    (["--backbone-arg", "embed_dim=8"], "needs --backbone SPEC"),
    (["--clip-set", "colour=red"], "unknown clip-set setting"),
    (["--clip-set", "classes=('bounce', 'nope')"], "give two or more distinct names"),
    (["--set", "train.nope=1"], "unknown key"),
])
def test_bad_input_is_refused_before_any_training(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        recipe.main(argv(tmp_path, *extra))
    assert not (tmp_path / "recipe" / "pretrain").exists()


def test_backbone_from_a_spec_gives_a_sequence():
    cfg = get_config("tiny", ["model.backbone='torchvision:swin3d_t'", "model.spatial_pool='mean'"]).model
    backbone = model_module.build_backbone(cfg)
    assert type(backbone).__name__ == "SwinBackbone" and backbone.out_channels == 768
    with torch.no_grad():
        feats = backbone.eval()(torch.zeros(1, 3, 8, 32, 32))
    assert feats.shape == (1, 768, 4)
    # an adapter registered later (SlowFast, VideoMAE) is found by class name
    cfg2 = get_config("tiny", ["model.backbone='torchvision:r3d_18'"]).model
    with pytest.raises(ValueError, match="VideoResNet, which has no sequence adapter"):
        model_module.build_backbone(cfg2)
    model_module.register_backbone("VideoResNet")(lambda net, c: ("adapted", type(net).__name__))
    try:
        assert model_module.build_backbone(cfg2) == ("adapted", "VideoResNet")
    finally:
        del model_module.BACKBONE_ADAPTERS["VideoResNet"]


def test_backbone_delay_keeps_the_backbone_still_then_warms_it_up():
    import train

    p_bb, p_head = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p_bb], "lr": 1.0, "name": "backbone"},
                             {"params": [p_head], "lr": 1.0, "name": "head"}])
    sched = train.warmup_cosine(opt, warmup_steps=2, total_steps=10, backbone_delay_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    bb, head = zip(*lrs)
    assert bb[:4] == (0.0,) * 4 and 0 < bb[4] < bb[5] < bb[6]          # still, then a fresh warm-up
    assert head[0] > 0 and head[2] == pytest.approx(1.0)               # the head is not delayed
    assert max(bb) == pytest.approx(1.0) and bb[-1] < bb[6]            # then cosine over what is left
