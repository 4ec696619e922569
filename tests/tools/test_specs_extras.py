"""Specs of the optional libraries: `transformers:Class`, `transformers:/dir`, `pytorchvideo:NAME`,
through build, default inputs, the CLI (inspect / convert / export) and save / load."""
import os

import pytest
import torch

import revwire
from conftest import perturb_weights
from revwire.tools.cli import main
from revwire.tools.specs import build_model, default_input, spec_of

T = pytest.importorskip("transformers")

VIDEOMAE = ["hidden_size=32", "num_hidden_layers=2", "num_attention_heads=2", "intermediate_size=64",
            "image_size=32", "patch_size=8", "num_frames=4", "tubelet_size=2"]


def _kw(items):
    from revwire.tools.specs import parse_model_kwargs
    return parse_model_kwargs(items)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_transformers_spec_builds_from_its_config_class():
    model = build_model("transformers:VideoMAEModel", _kw(VIDEOMAE))
    assert isinstance(model, T.VideoMAEModel) and model.config.num_hidden_layers == 2
    assert spec_of(model)["spec"] == "transformers:VideoMAEModel"
    x = default_input(model, "transformers:VideoMAEModel", batch=2)
    assert x.shape == (2, 4, 3, 32, 32)  # VideoMAE takes frames before channels
    vit = build_model("transformers:ViTModel", {"image_size": 48, "num_hidden_layers": 1})
    assert default_input(vit, "transformers:ViTModel").shape == (1, 3, 48, 48)


def test_transformers_spec_errors():
    with pytest.raises(revwire.SpecError, match="did you mean VideoMAEModel"):
        build_model("transformers:VideoMAEModle")
    with pytest.raises(revwire.SpecError, match="VideoMAEConfig has no field 'hiden_size'; did you mean hidden_size"):
        build_model("transformers:VideoMAEModel", {"hiden_size": 32})
    with pytest.raises(revwire.SpecError, match="cannot make VideoMAEConfig"):
        build_model("transformers:VideoMAEModel", {"num_hidden_layers": "x"})
    with pytest.raises(revwire.SpecError, match="no such directory"):
        build_model("transformers:/no/such/dir")
    with pytest.raises(revwire.SpecError, match="save_pretrained"):
        build_model("transformers:ViTModel", pretrained=True)


def test_transformers_local_dir_loads_a_saved_checkpoint(tmp_path):
    model = build_model("transformers:VideoMAEModel", _kw(VIDEOMAE))
    perturb_weights(model)
    model.save_pretrained(tmp_path / "ckpt")
    spec = f"transformers:{tmp_path / 'ckpt'}"
    loaded = build_model(spec)
    assert isinstance(loaded, T.VideoMAEModel)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = default_input(loaded, spec)
    rev = revwire.rewire(loaded, x)
    assert revwire.report(rev).num_blocks >= 4


def test_cli_inspect_convert_export_and_load(tmp_path, capsys):
    rc, out, err = run(capsys, "inspect", "transformers:VideoMAEModel", "--model-kwargs", *VIDEOMAE)
    assert rc == 0, err
    assert "revwire_stage0" in out and "step peak of one training step" in out and "rewired  " in out
    pt = tmp_path / "v.pt"
    rc, out, err = run(capsys, "convert", "transformers:VideoMAEModel", "--model-kwargs", *VIDEOMAE,
                       "--random-init", "-o", pt, "--verify")
    assert rc == 0, err
    assert "verify:" in out and "ok" in out
    rev = revwire.load(pt)
    assert isinstance(rev(torch.randn(1, 4, 3, 32, 32)), T.modeling_outputs.BaseModelOutput)
    plain = tmp_path / "v.pth"
    rc, out, err = run(capsys, "export", pt, "-o", plain)
    assert rc == 0, err
    original = build_model("transformers:VideoMAEModel", _kw(VIDEOMAE))
    original.load_state_dict(torch.load(plain, weights_only=True), strict=True)


def test_pytorchvideo_specs(tmp_path, capsys):
    pytest.importorskip("pytorchvideo")
    kwargs = {"stem_dim_outs": [8, 1], "head_pool_kernel_sizes": [[8, 1, 1], [32, 1, 1]], "model_num_class": 10}
    model = build_model("pytorchvideo:slowfast_r50", kwargs)
    x = default_input(model, "pytorchvideo:slowfast_r50", input_size=(3, 32, 32, 32), structured=True)
    assert [t.shape for t in x] == [(1, 3, 8, 32, 32), (1, 3, 32, 32, 32)]  # [slow, fast], alpha 4
    rev = revwire.rewire(model, (x,))
    assert [c.num_blocks for c in revwire.report(rev).chains] == [2, 2, 3, 3, 5, 5, 2, 2]
    path = tmp_path / "sf.pt"
    revwire.save(rev, path)
    again = revwire.load(path)  # rebuilt from the spec with a [slow, fast] input
    assert again.revwire_input_shapes == [[[1, 3, 8, 32, 32], [1, 3, 32, 32, 32]]]
    for k, v in rev.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # the command line takes SlowFast's [slow, fast] list input too
    cli_kwargs = ["stem_dim_outs=[8,1]", "head_pool_kernel_sizes=[[8,1,1],[32,1,1]]", "model_num_class=10"]
    base = ["pytorchvideo:slowfast_r50", "--input-size", "3,32,32,32", "--model-kwargs", *cli_kwargs]
    rc, out, err = run(capsys, "inspect", *base)
    assert rc == 0, err
    assert "revwire_stage0" in out and "step peak of one training step" in out
    cli_file = tmp_path / "sf-cli.pt"
    rc, out, err = run(capsys, "convert", *base, "--random-init", "-o", cli_file, "--verify")
    assert rc == 0, err
    assert "verify: reversible vs autograd on a random [1x3x8x32x32, 1x3x32x32x32] batch: ok" in out
    converted = revwire.load(cli_file)
    assert converted.revwire_input_shapes == [[[1, 3, 8, 32, 32], [1, 3, 32, 32, 32]]]
    rc, out, err = run(capsys, "export", cli_file, "-o", tmp_path / "sf.pth")
    assert rc == 0, err
    plain = build_model("pytorchvideo:slowfast_r50", kwargs)
    plain.load_state_dict(torch.load(tmp_path / "sf.pth", weights_only=True), strict=True)
    with pytest.raises(revwire.SpecError, match="did you mean"):
        build_model("pytorchvideo:slowfast_r5O")
