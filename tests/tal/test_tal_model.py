"""Head targets, losses, decoding, Soft-NMS, and the four backbone engines."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import math

import pytest
import torch

import revwire
from configs import ModelConfig
from losses import diou_loss_1d, sigmoid_focal_loss
from model import TALModel, build_model
from postprocess import VideoCollector, merge_video, soft_nms, tiou_matrix, window_to_seconds

TINY = ModelConfig(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=(4, 2, 2), neck_dim=16,
                   pyramid_levels=3, regression_ranges=((0, 4), (4, 8), (8, 1e4)), head_layers=1)
WINDOW, CROP = 32, 16          # 32 sampled frames -> 16 backbone steps -> pyramid 16, 8, 4


def points(model, steps=16):
    """The per-point fields of a forward output, without running the network."""
    centre, stride, level = [], [], []
    for l in range(model.cfg.pyramid_levels):
        n, s = steps // 2 ** l, 2 ** l
        centre += [(k + 0.5) * s for k in range(n)]
        stride += [float(s)] * n
        level += [l] * n
    return {"centre": torch.tensor(centre), "stride": torch.tensor(stride), "level": torch.tensor(level)}


# -- targets -----------------------------------------------------------------------------------

def test_assign_centre_sampling_and_ranges():
    model = TALModel(TINY, num_classes=3)
    out = points(model)
    # in sampled frames; the model works in backbone steps (/2): [2, 6] and [0, 16]
    segments = [torch.tensor([[4.0, 12.0], [0.0, 32.0]])]
    labels = [torch.tensor([0, 2])]
    cls_t, reg_t = model.assign(out, segments, labels)
    pos = torch.nonzero(cls_t[0].sum(-1)).squeeze(1).tolist()
    # short action: level-0 points at 3.5 and 4.5 (centre 4 +- 1.5, range 0..4);
    # long action: level-2 points at 6 and 10 (centre 8 +- 6, farthest boundary 10 in 8..inf)
    assert pos == [3, 4, 16 + 8 + 1, 16 + 8 + 2]
    assert cls_t[0, 3].tolist() == [1, 0, 0] and cls_t[0, 25].tolist() == [0, 0, 1]
    assert reg_t[0, 3].tolist() == [1.5, 2.5] and reg_t[0, 4].tolist() == [2.5, 1.5]
    assert reg_t[0, 25].tolist() == [6 / 4, 10 / 4] and reg_t[0, 26].tolist() == [10 / 4, 6 / 4]


def test_assign_prefers_the_shortest_action_and_handles_empty():
    model = TALModel(TINY, num_classes=2)
    out = points(model)
    segments = [torch.tensor([[2.0, 14.0], [4.0, 12.0]]), torch.zeros(0, 2)]
    labels = [torch.tensor([1, 0]), torch.zeros(0, dtype=torch.long)]
    cls_t, reg_t = model.assign(out, segments, labels)
    assert cls_t[0, 3].tolist() == [1, 0]      # both contain step 3.5; [2, 6] is shorter than [1, 7]
    assert reg_t[0, 3].tolist() == [1.5, 2.5]
    assert cls_t[1].sum() == 0 and reg_t[1].sum() == 0


# -- losses ------------------------------------------------------------------------------------

def test_focal_loss_values():
    logits = torch.tensor([0.0, 0.0, 10.0, -10.0])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    ln2 = math.log(2)
    assert loss[0].item() == pytest.approx(0.25 * 0.25 * ln2)
    assert loss[1].item() == pytest.approx(0.75 * 0.25 * ln2)
    assert loss[2].item() < 1e-9 and loss[3].item() < 1e-9     # confident and right: ~0
    no_alpha = sigmoid_focal_loss(logits[:1], targets[:1], alpha=-1, gamma=0.0)
    assert no_alpha.item() == pytest.approx(ln2)              # gamma 0, no alpha: cross-entropy


def test_diou_loss_values():
    pred = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [0.5, 1.5], [2.0, 0.0]])
    loss = diou_loss_1d(pred, target)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-7)
    # inter 1.5, union 2.5, enclosing 2.5, centres 0 and 0.5 apart -> 1 - 0.6 + 0.04
    assert loss[1].item() == pytest.approx(0.44)
    # disjoint: [c, c+1] vs [c-2, c]: IoU 0, enclosing 3, centres 1.5 apart -> 1 + 0.25
    assert loss[2].item() == pytest.approx(1.25)


# -- decoding and NMS --------------------------------------------------------------------------

def test_predict_decodes_boundaries_in_sampled_frames():
    model = TALModel(TINY, num_classes=2)
    out = points(model)
    P = len(out["centre"])
    out["cls"] = torch.full((1, P, 2), -20.0)
    out["reg"] = torch.zeros(1, P, 2)
    out["mask"] = torch.ones(1, P, dtype=torch.bool)
    k = 16 + 2                                    # level 1, point 2: centre 5 steps, stride 2
    out["cls"][0, k, 1] = 5.0
    out["reg"][0, k] = torch.tensor([1.0, 0.5])   # 2 steps left, 1 step right -> steps [3, 6]
    (pred,) = model.predict(out, torch.tensor([32]), score_thresh=0.5)
    assert pred["labels"].tolist() == [1]
    assert pred["segments"].tolist() == [[6.0, 12.0]]
    assert pred["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    (clipped,) = model.predict(out, torch.tensor([10]), score_thresh=0.5)   # window holds 10 real frames
    assert clipped["segments"].tolist() == [[6.0, 10.0]]
    out["mask"][0, k] = False                     # a padded point never predicts
    assert len(model.predict(out, torch.tensor([32]), score_thresh=0.5)[0]["scores"]) == 0


def test_soft_nms_decays_overlaps():
    segs = torch.tensor([[0.0, 10.0], [0.0, 10.0], [20.0, 30.0], [0.0, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, decayed = soft_nms(segs, scores, sigma=0.5, min_score=0.001)
    assert keep.tolist() == [0, 2, 3, 1]
    # order: [0,10] (0.9), [20,30] (0.7, no overlap), [0,5] (0.6 decayed by tIoU 0.5 with [0,10]),
    # the copy of [0,10] last (decayed by tIoU 1, then by tIoU 0.5 with [0,5])
    assert decayed[:2].tolist() == pytest.approx([0.9, 0.7])
    assert decayed[2].item() == pytest.approx(0.6 * math.exp(-0.25 / 0.5))
    assert decayed[3].item() == pytest.approx(0.8 * math.exp(-1 / 0.5) * math.exp(-0.25 / 0.5))
    keep, _ = soft_nms(segs, scores, sigma=0.5, min_score=0.5)
    assert keep.tolist() == [0, 2]
    assert tiou_matrix(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])).item() == 0.0


def test_windows_merge_into_seconds_per_video():
    assert window_to_seconds(torch.tensor([[6.0, 12.0]]), start=32, stride=2.0, fps=10.0, duration=100.0)[0].tolist() \
        == pytest.approx([7.6, 8.8])
    assert window_to_seconds(torch.tensor([[0.0, 40.0]]), 0, 1.0, 10.0, 3.0).tolist() == [[0.0, 3.0]]
    collector = VideoCollector(["a", "b"], sigma=0.5, min_score=0.01, max_segments=10)
    pred = {"segments": torch.tensor([[10.0, 20.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    collector.add("v", pred, start=0, stride=1.0, fps=10.0, duration=10.0)   # [1, 2] s
    collector.add("v", pred, start=0, stride=1.0, fps=10.0, duration=10.0)   # the same action, seen twice
    res = collector.results(["v", "empty"])["results"]
    assert res["empty"] == []
    assert res["v"][0] == {"label": "b", "score": 0.9, "segment": [1.0, 2.0]}
    assert res["v"][1]["score"] == pytest.approx(0.9 * math.exp(-2), abs=1e-6)   # rounded to 6 places
    assert merge_video([])["segments"].shape == (0, 2)


# -- engines -----------------------------------------------------------------------------------

def example():
    return torch.zeros(1, 3, WINDOW, CROP, CROP)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, WINDOW, CROP, CROP, generator=g)
    valid = torch.tensor([WINDOW, 20])
    segs = [torch.tensor([[4.0, 12.0], [16.0, 30.0]]), torch.tensor([[2.0, 10.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    return x, valid, segs, labels


def grads(model, engine_batch):
    x, valid, segs, labels = engine_batch
    model.zero_grad(set_to_none=True)
    model.loss_normalizer = None           # the loss divides by an EMA of positives: start it equal
    out = model(x, valid)
    loss = model.loss(out, segs, labels)["loss"]
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def rewired():
    torch.manual_seed(0)
    return build_model(TINY, 2, example(), engine="reversible")


def test_reversible_matches_autograd_engine(rewired):
    assert len(revwire.stages(rewired.backbone)) == 2          # one per Swin stage of two blocks
    rewired.train()
    out_rev, g_rev = grads(rewired, batch())
    rewired.set_engine("autograd")
    try:
        out_ref, g_ref = grads(rewired, batch())
    finally:
        rewired.set_engine("reversible")
    assert torch.allclose(out_rev["cls"], out_ref["cls"], atol=1e-6)
    assert set(g_rev) == set(g_ref) and any(n.startswith("backbone.") for n in g_rev)
    for name in g_ref:
        err = (g_rev[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-12)
        assert err < 1e-4, name


def test_rewired_state_dict_loads_into_plain_model(rewired):
    plain = build_model(TINY, 2, example(), engine="checkpoint")
    assert set(plain.state_dict()) == set(rewired.state_dict())
    plain.load_state_dict(rewired.state_dict(), strict=True)
    with pytest.raises(ValueError, match="cannot switch engine"):
        rewired.set_engine("checkpoint")


def test_checkpoint_engine_matches_plain_autograd():
    torch.manual_seed(0)
    model = build_model(TINY, 2, example(), engine="checkpoint")
    out_ck, g_ck = grads(model, batch())
    model.backbone.checkpoint_blocks = False
    out_ref, g_ref = grads(model, batch())
    assert torch.equal(out_ck["cls"], out_ref["cls"])
    for name in g_ref:
        assert torch.allclose(g_ck[name], g_ref[name], rtol=1e-4, atol=1e-7), name


def test_frozen_engine_trains_head_only():
    model = build_model(TINY, 2, example(), engine="frozen")
    model.train()
    assert not model.backbone.training and model.pyramid.training
    _, g = grads(model, batch())
    assert g and not any(n.startswith("backbone.") for n in g)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_engine_errors():
    model = TALModel(TINY, 2)
    with pytest.raises(ValueError, match="unknown engine"):
        model.set_engine("fast")
    with pytest.raises(ValueError, match="needs an example clip"):
        model.set_engine("reversible")
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.zeros(2, WINDOW, CROP, CROP), torch.tensor([WINDOW, WINDOW]))


def test_load_local_torchvision_weights(tmp_path):
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    swin = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                             window_size=[4, 2, 2], num_classes=400)
    torch.save(swin.state_dict(), tmp_path / "swin.pth")
    cfg = ModelConfig(**{**TINY.__dict__, "weights": str(tmp_path / "swin.pth")})
    model = TALModel(cfg, 2)
    assert torch.equal(model.backbone.features[0][0].attn.qkv.weight, swin.features[0][0].attn.qkv.weight)
    bad = ModelConfig(**{**cfg.__dict__, "embed_dim": 32})
    with pytest.raises(ValueError, match="does not fit this backbone"):
        TALModel(bad, 2)
