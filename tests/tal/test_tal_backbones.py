"""Backbones from revwire model specs: pytorchvideo's SlowFast and transformers' VideoMAE, small.

For each: the (B, C, T') sequence, the rewired localiser's gradients against the autograd
engine's (float64), checkpointing per residual block (same gradients, BatchNorm statistics
updated once), weights files, and two training steps through train.py.
"""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import dataclasses

import pytest
import torch

import revwire
import train
from configs import ModelConfig
from model import SlowFastBackbone, TALModel, build_backbone, build_model
from test_tal_train import TINY_RUN

pytest.importorskip("pytorchvideo")
pytest.importorskip("transformers")

WINDOW, CROP = 32, 16
# R50's depths at an eighth of its width (the smallest pytorchvideo's builder allows: stem_dim_outs)
SLOWFAST = {"stem_dim_outs": [8, 1], "slowfast_channel_reduction_ratio": [8], "dropout_rate": 0.0}
VIDEOMAE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": CROP, "patch_size": 8, "tubelet_size": 2, "num_frames": WINDOW}
# spec, kwargs, channels per pooling ("mean"), temporal stride, reversible stages, a module inside a block
BACKBONES = {
    "slowfast": ("pytorchvideo:slowfast_r50", SLOWFAST, 256 + 32, 4, 8,
                 "blocks.2.multipathway_blocks.0.res_blocks.1.branch2"),
    "videomae": ("transformers:VideoMAEModel", VIDEOMAE, 32, 2, 1, "videomae.encoder.layer.0.intermediate"),
}


def model_cfg(name, **kw):
    spec, kwargs = BACKBONES[name][:2]
    return ModelConfig(backbone=spec, backbone_kwargs=kwargs, neck_dim=16, pyramid_levels=3,
                       regression_ranges=((0, 4), (4, 8), (8, 1e4)), head_layers=1, **kw)


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, WINDOW, CROP, CROP, generator=g).to(dtype)
    valid = torch.tensor([WINDOW, 20])
    segs = [torch.tensor([[4.0, 12.0], [16.0, 30.0]]), torch.tensor([[2.0, 10.0]])]
    return x, valid, segs, [torch.tensor([0, 1]), torch.tensor([1])]


def grads(model, data):
    x, valid, segs, labels = data
    model.zero_grad(set_to_none=True)
    model.loss_normalizer = None
    out = model(x, valid)
    model.loss(out, segs, labels)["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_sequence_shape_and_pooling(name):
    _, _, channels, stride, _, _ = BACKBONES[name]
    torch.manual_seed(0)
    both = build_backbone(model_cfg(name)).eval()            # the default pooling: mean+max
    assert (both.out_channels, both.temporal_stride) == (2 * channels, stride)
    x = batch()[0]
    with torch.no_grad():
        feats = both(x)
        torch.manual_seed(0)
        mean = build_backbone(model_cfg(name, spatial_pool="mean")).eval()
        mean_feats = mean(x)
    assert feats.shape == (2, 2 * channels, WINDOW // stride)
    assert mean.out_channels == channels and mean_feats.shape == (2, channels, WINDOW // stride)
    if name == "slowfast":    # slow then fast channels, each mean then max (at 16² both end 1x1: max = mean)
        assert torch.allclose(feats[:, :256], mean_feats[:, :256]) and torch.allclose(feats[:, 512:544], mean_feats[:, 256:])
    else:                     # 2x2 tokens per tubelet: the max half is not the mean
        assert torch.allclose(feats[:, :channels], mean_feats)
        assert not torch.allclose(feats[:, channels:], mean_feats, atol=1e-3)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_reversible_gradients_match_autograd(name):
    stages = BACKBONES[name][4]
    torch.manual_seed(0)
    model = TALModel(model_cfg(name), num_classes=2).double()
    model.set_engine("reversible", batch(torch.float64)[0][:1])
    assert len(revwire.stages(model.backbone)) == stages     # every chain rewired (SlowFast: both pathways)
    model.train()
    out_rev, g_rev = grads(model, batch(torch.float64))
    model.set_engine("autograd")
    out_ref, g_ref = grads(model, batch(torch.float64))
    assert torch.allclose(out_rev["cls"], out_ref["cls"], rtol=1e-9, atol=1e-12)
    assert set(g_rev) == set(g_ref) and sum(n.startswith("backbone.") for n in g_ref) > 10
    for n in g_ref:
        err = (g_rev[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-30)
        assert err < 1e-7, (n, err.item())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_checkpoint_blocks_same_gradients_and_statistics(name):
    inner = BACKBONES[name][5]
    torch.manual_seed(0)
    model = build_model(model_cfg(name), 2, batch()[0][:1], engine="checkpoint").train()
    assert model.backbone.checkpoint_blocks
    calls = []
    model.backbone.get_submodule(inner).register_forward_hook(lambda *a: calls.append(1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out_ck, g_ck = grads(model, batch())
    assert len(calls) == 2                 # forward, then recomputed in backward: the block is checkpointed
    after_ck = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    model.backbone.checkpoint_blocks = False
    assert not model.backbone.checkpoint_blocks
    out_ref, g_ref = grads(model, batch())
    assert len(calls) == 3
    assert torch.allclose(out_ck["cls"], out_ref["cls"], atol=1e-6)
    assert set(g_ck) == set(g_ref)
    for n in g_ref:
        assert torch.allclose(g_ck[n], g_ref[n], rtol=1e-4, atol=1e-7), n
    # BatchNorm running statistics (SlowFast) moved once, as without checkpointing
    for k, v in model.state_dict().items():
        assert torch.equal(after_ck[k], v), k


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_load_weights(name, tmp_path):
    spec, kwargs = BACKBONES[name][:2]
    net = revwire.build_model(spec, kwargs)                     # the library's own module, head included
    torch.save(net.state_dict(), tmp_path / "native.pt")
    backbone = build_backbone(model_cfg(name))
    backbone.load_weights(str(tmp_path / "native.pt"))
    for k, v in backbone.state_dict().items():                  # every tensor came from the file
        assert torch.equal(v, net.state_dict()[k.removeprefix("videomae.")]), k
    torch.save(backbone.state_dict(), tmp_path / "own.pt")      # the recipe saves the adapter's own keys
    again = build_backbone(model_cfg(name))
    again.load_weights(str(tmp_path / "own.pt"))
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in again.state_dict().items())
    other = {"slowfast": {**SLOWFAST, "stem_dim_outs": [16, 2]}, "videomae": {**VIDEOMAE, "hidden_size": 48}}[name]
    with pytest.raises(ValueError, match="does not fit this backbone"):
        build_backbone(dataclasses.replace(model_cfg(name), backbone_kwargs=other)).load_weights(str(tmp_path / "own.pt"))


def test_refusals():
    from pytorchvideo.models.net import Net

    with pytest.raises(ValueError, match="not a two-pathway SlowFast"):   # pytorchvideo's other models are Nets too
        SlowFastBackbone(Net(blocks=torch.nn.ModuleList([torch.nn.Conv3d(3, 8, 1)])), ModelConfig())
    videomae = build_backbone(model_cfg("videomae"))
    with pytest.raises(ValueError, match="num_frames=16 and image_size=16"):
        videomae(torch.zeros(1, 3, 16, CROP, CROP))
    with pytest.raises(ValueError, match="multiple of the backbone's temporal stride"):
        build_model(model_cfg("slowfast"), 2, torch.zeros(1, 3, 24, CROP, CROP), engine="checkpoint")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_two_training_steps_through_train_py(name, tmp_path, monkeypatch):
    spec, kwargs = BACKBONES[name][:2]
    seen = {}
    build = train.build_model

    def spy(*args, **kw):
        model = build(*args, **kw)
        seen["model"] = model
        seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("backbone.")}
        return model

    monkeypatch.setattr(train, "build_model", spy)
    argv = ["--config", "tiny", "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1",
            "--set", f"data.cache_dir={str(tmp_path / 'cache')!r}"]
    for item in TINY_RUN + ["data.synthetic.num_train=4", "data.synthetic.num_val=1", "train.weight_decay=0.0",
                            f"model.backbone={spec!r}", f"model.backbone_kwargs={kwargs!r}"]:
        argv += ["--set", item]
    res = train.main(argv)
    (entry,) = res["history"]
    assert torch.isfinite(torch.tensor(entry["loss"]))
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["scheduler"]["last_epoch"] == 2 and ckpt["engine"] == "reversible"   # two steps, rewired
    assert len(revwire.stages(seen["model"].backbone)) == BACKBONES[name][4]
    # no weight decay: a backbone weight moves only if its gradient reached it
    moved = {n for n, v in seen["start"].items() if not torch.equal(v, ckpt["model"][n])}
    # SlowFast's zero-initialised norms too: pytorchvideo zero-initialises each block's last
    # BatchNorm, and the ReLU moved into a rewired branch still passes gradient at 0 (before,
    # every branch but a stage's first was stuck at this init)
    zero_init = {n for n, v in seen["start"].items() if n.endswith(".weight") and not v.any()}
    assert (len(zero_init) > 10) == (name == "slowfast") and zero_init <= moved
    # the rest moved too, but for the one-channel norm weights of this tiny config's fast
    # pathway, whose gradient can vanish (a normalised single channel)
    unmoved = set(seen["start"]) - moved
    assert all(seen["start"][n].numel() == 1 and ".norm_" in n for n in unmoved) and len(moved) > 10
