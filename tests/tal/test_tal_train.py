"""End to end on the CPU: two tiny epochs through the reversible backbone, then resume and evaluate."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import json

import pytest
import torch

import data
import train
from metrics import evaluate

TINY_RUN = [
    "train.batch_size=2", "train.lr=3e-3", "train.backbone_lr=2e-3", "train.warmup_epochs=0.0",
    "train.ema_decay=0.0", "train.seed=1",
    "data.window=32", "data.resize=20", "data.crop=16", "data.scale_jitter=(1.0, 1.0)",
    "data.synthetic.num_train=16", "data.synthetic.num_val=3", "data.synthetic.num_classes=2",
    "data.synthetic.size=20", "data.synthetic.min_frames=32", "data.synthetic.max_frames=48",
    "data.synthetic.min_action=6", "data.synthetic.max_action=14", "data.synthetic.max_actions=2",
    "model.embed_dim=16", "model.depths=(2, 2)", "model.num_heads=(1, 2)", "model.window_size=(4, 2, 2)",
    "model.neck_dim=16", "model.head_layers=1", "model.pyramid_levels=3",
    "model.regression_ranges=((0, 4), (4, 8), (8, 10000.0))",
]


def run(tmp_path, *extra):
    argv = ["--config", "tiny", "--out", str(tmp_path / "run"), "--quiet", "--set", f"data.cache_dir={str(tmp_path / 'cache')!r}"]
    for item in TINY_RUN:
        argv += ["--set", item]
    return train.main(argv + list(extra))


def test_two_tiny_epochs_train_the_backbone(tmp_path, monkeypatch):
    initial = {}
    build = train.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train, "build_model", spy)
    out = run(tmp_path, "--epochs", "2", "--eval-every", "2")
    hist = out["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["loss"] < hist[0]["loss"], hist

    run_dir = tmp_path / "run"
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["engine"] == "reversible" and ckpt["epoch"] == 2
    backbone = [k for k in initial if k.startswith("backbone.") and initial[k].is_floating_point()]
    assert backbone
    changed = [k for k in backbone if not torch.equal(initial[k], ckpt["model"][k])]
    # every trainable backbone tensor moved (buffers such as relative_position_index do not)
    trainable = [k for k in backbone if "relative_position_index" not in k]
    assert set(changed) == set(trainable)

    # the predictions file is valid ActivityNet results for every held-out video
    gt = json.loads((run_dir.parent / "cache").glob("synthetic-*/annotations.json").__next__().read_text())
    videos = data.parse_database(gt)
    preds = json.loads((run_dir / "predictions.json").read_text())
    val = {v for v, r in videos.items() if r.subset == "validation"}
    assert set(preds["results"]) == val
    classes = set(ckpt["classes"])
    n = 0
    for vid, items in preds["results"].items():
        for p in items:
            n += 1
            assert p["label"] in classes and 0.0 <= p["score"] <= 1.0
            assert 0.0 <= p["segment"][0] <= p["segment"][1] <= videos[vid].duration + 1e-6
    assert n > 0
    res = evaluate(gt, preds, "validation", [0.3, 0.4, 0.5, 0.6, 0.7])   # the tiny preset's thresholds
    assert 0.0 <= res["average_mAP"] <= 1.0
    assert hist[1]["average_mAP"] == pytest.approx(res["average_mAP"], abs=1e-5)
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged] == [1, 2]


def test_resume_and_eval_only(tmp_path):
    run(tmp_path, "--epochs", "1", "--eval-every", "5", "--engine", "checkpoint")
    resumed = run(tmp_path, "--epochs", "2", "--eval-every", "5", "--engine", "checkpoint", "--resume", "auto")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["scheduler"]["last_epoch"] == 2 * 8   # 16 videos / batch 2, two epochs
    res = run(tmp_path, "--engine", "checkpoint", "--eval-only", "--resume", str(tmp_path / "run" / "last.pt"))
    assert 0.0 <= res["average_mAP"] <= 1.0
    with pytest.raises(ValueError, match="computes a different function"):
        run(tmp_path, "--engine", "reversible", "--eval-only", "--resume", str(tmp_path / "run" / "last.pt"))
    with pytest.raises(ValueError, match="model.engine='fast'"):
        run(tmp_path, "--set", "model.engine='fast'")
