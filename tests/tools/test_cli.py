"""The `revwire` command (issue 4): inspect, convert, export, and every bad-input case."""
import hashlib
import json
import os
import random
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import revwire
from conftest import perturb_weights
from revwire.tools import checkpoint as ckpt
from revwire.tools.cli import main

MODULE = "revwire_cli_models"


# spec, --input-size, --model-kwargs, checkpoint layout, expected chain lengths, --verify
MODELS = {
    "resnet18": ("timm:resnet18", "3,64,64", [], "ddp", [2], True),
    "vit": ("timm:vit_tiny_patch16_224", "3,64,64", ["img_size=64"], "safetensors", [24], True),
    "swin3d": ("torchvision:swin3d_t", "3,4,32,32", [], "state_dict", [4, 4, 12, 4], False),  # keeps the test fast
}


def _kwargs(items):
    from revwire.tools.specs import parse_model_kwargs

    return parse_model_kwargs(items)


def _perturb(model, seed):
    return perturb_weights(model, seed)


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One checkpoint per model, each in a different timm-style layout."""
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for i, (key, (spec, _, kw, layout, _, _)) in enumerate(MODELS.items()):
        sd = _perturb(revwire.build_model(spec, _kwargs(kw)), seed=i).state_dict()
        if layout == "ddp":
            path = d / f"{key}.pth"
            torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
        elif layout == "safetensors":
            path = d / f"{key}.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, path)
        else:
            path = d / f"{key}.pth"
            torch.save({"state_dict": sd, "optimizer": {}, "epoch": 3}, path)
        out[key] = (str(path), sd)
    return out


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Chain(nn.Module):
            def __init__(self, width=8, depth=3):
                super().__init__()
                self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh())
                                            for _ in range(depth))

            def forward(self, x):
                for b in self.blocks:
                    x = x + b(x)
                return x

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

            def forward(self, x):
                if x.sum() > 0:  # control flow on a tensor value: fx cannot trace it
                    x = x + self.a(x)
                return x + self.b(x)

        class Gate(nn.Module):  # untraceable unless kept as a leaf
            def forward(self, x):
                return x if bool(x.sum() > -1e9) else -x

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList(nn.Sequential(Gate(), nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

            def forward(self, x):
                for b in self.blocks:
                    x = x + b(x)
                return x

        def chain(width=8, depth=3):
            return Chain(width, depth)

        def mlp():
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return MODULE


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_bad_input(rc, out, err, *words):
    """Exit status 2, exactly one line `revwire: error: ...` on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("revwire: error: "), err
    assert "Traceback" not in err + out
    for w in words:
        assert w in lines[0], (w, lines[0])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("key", list(MODELS))
def test_convert_load_export_round_trip(key, ckpts, tmp_path, capsys):
    spec, size, kw, _, chains, check = MODELS[key]
    path, sd = ckpts[key]
    before = _digest(path)
    out = tmp_path / "rev.pt"
    extra = (["--model-kwargs", *kw] if kw else []) + (["--verify"] if check else [])
    rc, stdout, err = run(capsys, "convert", spec, "--checkpoint", path, "-o", out, "--input-size", size, *extra)
    assert rc == 0, err
    assert ("verify: reversible vs autograd" in stdout and ": ok (" in stdout) == check
    assert f"wrote {out}" in stdout
    assert _digest(path) == before  # the input is never modified
    assert os.listdir(tmp_path) == ["rev.pt"]  # no temporary left over

    data = torch.load(out, weights_only=True)
    assert data["spec"] == spec and data["model_kwargs"] == _kwargs(kw)
    assert data["revwire_version"] == revwire.__version__
    assert (data["verify"] or {}).get("ok", False) == check
    assert _sd_equal(data["state_dict"], sd)

    rev = revwire.load(out)
    assert [len(s.blocks) for s in revwire.stages(rev)] == chains
    assert _sd_equal(rev.state_dict(), sd)
    # Same outputs as rewiring the original model with those weights.
    original = revwire.build_model(spec, _kwargs(kw))
    original.load_state_dict(sd, strict=True)
    shape = [1, *map(int, size.split(","))]
    ref = revwire.rewire(original, torch.randn(shape))
    x = torch.randn(2, *shape[1:])
    rev.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(rev(x), ref(x), rtol=0, atol=0)

    # export: a plain state_dict that loads strictly into the original architecture.
    plain = tmp_path / "plain.pth"
    rc, stdout, err = run(capsys, "export", out, "-o", plain)
    assert rc == 0, err
    with torch.no_grad():
        for t in original.state_dict().values():
            t.zero_()
    original.load_state_dict(torch.load(plain, weights_only=True), strict=True)
    assert _sd_equal(original.state_dict(), sd)


def test_convert_json_and_ema(ckpts, tmp_path, capsys):
    spec = "timm:resnet18"
    sd = ckpts["resnet18"][1]
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "ema.pth")
    rc, stdout, err = run(capsys, "convert", spec, "--checkpoint", tmp_path / "ema.pth", "-o", tmp_path / "a.pt",
                          "--input-size", "3,64,64", "--json")
    assert rc == 0, err
    data = json.loads(stdout)
    assert data["source"]["state_dict_key"] == "state_dict_ema" and data["verify"] is None
    assert [c["num_blocks"] for c in data["report"]["chains"]] == [2]
    assert _sd_equal(torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"], ema)
    rc, stdout, err = run(capsys, "convert", spec, "--checkpoint", tmp_path / "ema.pth", "-o", tmp_path / "b.pt",
                          "--input-size", "3,64,64", "--no-ema", "--quiet")
    assert rc == 0 and stdout == "" and err == ""
    assert _sd_equal(torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"], sd)


def test_convert_random_init_and_force(tmp_path, capsys, user_module):
    out = tmp_path / "rev.pt"
    out.write_bytes(b"keep me")
    spec = f"module:{user_module}:chain"
    rc, stdout, err = run(capsys, "convert", spec, "--random-init", "-o", out, "--input-size", "8")
    assert_bad_input(rc, stdout, err, "exists; pass --force")
    assert out.read_bytes() == b"keep me"
    rc, stdout, err = run(capsys, "convert", spec, "--random-init", "-o", out, "--input-size", "8",
                          "--model-kwargs", "depth=5", "--force")
    assert rc == 0, err
    rev = revwire.load(out, trust_code=True)
    assert [len(s.blocks) for s in revwire.stages(rev)] == [5]
    assert set(os.listdir(tmp_path)) == {f"{MODULE}.py", "rev.pt"}


def test_leaf_module_option_is_kept(tmp_path, capsys, user_module):
    base = ["convert", f"module:{user_module}:Gated", "--random-init", "--input-size", "8", "--batch", "2"]
    rc, out, err = run(capsys, *base, "-o", tmp_path / "a.pt")
    assert_bad_input(rc, out, err, "could not trace")
    rc, out, err = run(capsys, *base, "-o", tmp_path / "a.pt", "--leaf-module", f"{user_module}:Gate", "--verify")
    assert rc == 0, err
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    assert data["rewire_options"]["leaf_modules"] == [f"{user_module}:Gate"] and data["input_shapes"] == [[2, 8]]
    rev = revwire.load(tmp_path / "a.pt", trust_code=True)
    assert [len(s.blocks) for s in revwire.stages(rev)] == [3]
    rc, out, err = run(capsys, *base, "-o", tmp_path / "b.pt", "--leaf-module", f"{user_module}.Gate")
    assert_bad_input(rc, out, err, "package.module:Name")


def test_verify_failure_writes_nothing(tmp_path, capsys, user_module, monkeypatch):
    import revwire.tools.cli as cli

    real = cli.verify
    monkeypatch.setattr(cli, "verify", lambda *a, **k: dict(real(*a, **k), ok=False))
    rc, stdout, err = run(capsys, "convert", f"module:{user_module}:chain", "--random-init", "-o",
                          tmp_path / "rev.pt", "--input-size", "8", "--verify")
    assert rc == 1 and "FAILED" in err and "not written" in err
    assert os.listdir(tmp_path) == [f"{MODULE}.py"]


# --------------------------------------------------------------------------- inspect


def test_inspect_text_json_quiet(capsys):
    args = ["inspect", "timm:vit_tiny_patch16_224", "--model-kwargs", "img_size=64", "--input-size", "3,64,64",
            "--batch", "8"]
    rc, stdout, err = run(capsys, *args)
    assert rc == 0, err
    assert "revwire_stage0  24" in stdout and "step peak of one training step" in stdout
    for name in ("original", "checkpoint", "rewired", "model state"):
        assert f"  {name}" in stdout, name
    rc, stdout, err = run(capsys, *args, "--json")
    assert rc == 0, err
    data = json.loads(stdout)
    mem = data["memory"]
    assert data["input_shape"] == [8, 3, 64, 64] and mem["device"] == "cpu"
    assert [c["num_blocks"] for c in data["report"]["chains"]] == [24]
    # the model state, counted by hand: parameters, gradients, AdamW's two moments (fp32),
    # its 0-dim fp32 step per parameter, the batch; no buffers in a ViT
    model = revwire.build_model("timm:vit_tiny_patch16_224", {"img_size": 64})
    params = list(model.parameters())
    P = sum(p.numel() * 4 for p in params)
    assert mem["model_state"] == 4 * P + 4 * len(params) + 8 * 3 * 64 * 64 * 4
    assert mem["model_state_by_kind"]["unseen"] == 0
    for name in ("original", "checkpoint", "rewired"):
        assert mem[f"{name}_activations"] > 0
        assert mem[name] == mem["model_state"] + mem[f"{name}_activations"], name
        assert mem[f"{name}_peak_at"].split(":")[0] in ("forward", "backward", "optimizer")
    # checkpointing every block keeps one block's activations instead of twelve
    assert mem["checkpoint_activations"] < mem["original_activations"] / 2, mem
    assert mem["activation_ratio"] == mem["rewired_activations"] / mem["original_activations"]
    rc, stdout, err = run(capsys, *args, "--quiet")
    assert rc == 0 and len(stdout.strip().splitlines()) == 1
    assert stdout.startswith("timm:vit_tiny_patch16_224: 1 chain, 24 blocks; step peak ")


def test_readme_command_fits_fixed_size_timm_models(capsys, tmp_path):
    """The README's command: a ViT at another size is built with img_size to match."""
    rc, out, err = run(capsys, "inspect", "timm:vit_tiny_patch16_224", "--input-size", "3,64,64", "--batch", "2")
    assert rc == 0, err
    assert "img_size=64" in out and "1x17x192" not in out and "2x17x192" in out
    sd = revwire.build_model("timm:vit_tiny_patch16_224").state_dict()  # a 224 checkpoint
    torch.save(sd, tmp_path / "vit224.pth")
    rc, out, err = run(capsys, "convert", "timm:vit_tiny_patch16_224", "--checkpoint", tmp_path / "vit224.pth",
                       "-o", tmp_path / "o.pt", "--input-size", "3,64,64")
    assert_bad_input(rc, out, err, "mis-shaped: pos_embed (1x197x192 in file, 1x17x192 in model)")


def test_inspect_cuda_without_gpu(capsys, user_module):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, stdout, err = run(capsys, "inspect", f"module:{user_module}:chain", "--input-size", "8", "--device", "cuda")
    assert_bad_input(rc, stdout, err, "no CUDA device")


@pytest.mark.parametrize("command", [[], ["inspect"], ["convert"], ["export"]])
def test_help(capsys, command):
    rc, stdout, err = run(capsys, *command, "--help")
    assert rc == 0 and stdout.startswith(f"usage: revwire {' '.join(command)}".rstrip())
    assert "example" in stdout


# --------------------------------------------------------------------------- bad input


def test_unknown_model(capsys, tmp_path):
    rc, out, err = run(capsys, "inspect", "timm:resnet19")
    assert_bad_input(rc, out, err, "unknown timm model 'resnet19'", "did you mean resnet18")
    rc, out, err = run(capsys, "convert", "torchvision:swin3d_z", "--random-init", "-o", tmp_path / "o.pt")
    assert_bad_input(rc, out, err, "swin3d_t")
    assert os.listdir(tmp_path) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["missing", "directory", "corrupt", "truncated", "truncated_safetensors",
                                  "raw_pickle", "raw_pickle_running_code", "other_architecture",
                                  "other_num_classes"])
def test_bad_checkpoints(case, ckpts, tmp_path, capsys):
    path, sd = ckpts["resnet18"]
    spec, extra = "timm:resnet18", []
    words = []
    if case == "missing":
        path, words = tmp_path / "nope.pth", ["nope.pth not found"]
    elif case == "directory":
        path, words = tmp_path, ["is a directory"]
    elif case == "corrupt":
        path, words = tmp_path / "bad.pth", ["not a readable PyTorch or safetensors file"]
        path.write_bytes(b"GARBAGE" + random.Random(0).randbytes(4096))  # not a pickle opcode first
    elif case == "truncated":
        path, words = tmp_path / "cut.pth", ["not a readable PyTorch or safetensors file"]
        full = open(ckpts["resnet18"][0], "rb").read()
        path.write_bytes(full[: len(full) * 2 // 3])
    elif case == "truncated_safetensors":
        full = open(ckpts["vit"][0], "rb").read()
        path, words = tmp_path / "cut.safetensors", ["not a valid safetensors file"]
        path.write_bytes(full[:-1000])
    elif case.startswith("raw_pickle"):  # pickle.dump, not torch.save: one line, nothing unpickled
        path, words = tmp_path / "raw.pkl", ["is a plain pickle file", "torch.save(state_dict, PATH)"]
        with open(path, "wb") as f:
            pickle.dump(_RunsCode(tmp_path / "ran") if case.endswith("code") else sd, f)
    elif case == "other_architecture":
        spec, words = "timm:resnet34", ["does not match timm:resnet34", "missing keys: layer1.2.conv1.weight"]
    elif case == "other_num_classes":
        extra = ["--model-kwargs", "num_classes=7"]
        words = ["mis-shaped: fc.weight (1000x512 in file, 7x512 in model)", "num_classes"]
    before = _digest(path) if os.path.isfile(path) else None
    listing = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.pt"
    rc, stdout, err = run(capsys, "convert", spec, "--checkpoint", path, "-o", out, "--input-size", "3,64,64", *extra)
    assert_bad_input(rc, stdout, err, *words)
    assert not (tmp_path / "ran").exists()
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written, no temporary left
    if before is not None:
        assert _digest(path) == before


def test_output_problems(ckpts, tmp_path, capsys, monkeypatch):
    path = ckpts["resnet18"][0]
    before = _digest(path)
    (tmp_path / "afile").write_bytes(b"x")
    base = ["convert", "timm:resnet18", "--checkpoint", path, "--input-size", "3,64,64"]
    rc, out, err = run(capsys, *base, "-o", tmp_path / "nodir" / "o.pt")
    assert_bad_input(rc, out, err, "does not exist")
    rc, out, err = run(capsys, *base, "-o", tmp_path / "afile" / "o.pt")
    assert_bad_input(rc, out, err, "is not a directory")
    rc, out, err = run(capsys, *base, "-o", path, "--force")  # never overwrite the input
    assert_bad_input(rc, out, err, "is the input file")
    assert _digest(path) == before
    # A directory we may not write into (simulated: the tests may run as root).
    monkeypatch.setattr(ckpt.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    rc, out, err = run(capsys, *base, "-o", tmp_path / "o.pt")
    assert_bad_input(rc, out, err, "Permission denied")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_untraceable_and_no_chain(capsys, tmp_path, user_module):
    rc, out, err = run(capsys, "convert", f"module:{user_module}:Branchy", "--random-init", "-o", tmp_path / "o.pt",
                       "--input-size", "8")
    assert_bad_input(rc, out, err, "could not trace", "leaf_modules")
    rc, out, err = run(capsys, "inspect", f"module:{user_module}:mlp", "--input-size", "8")
    assert_bad_input(rc, out, err, "no chain of >= 2 same-shape residual blocks")
    assert sorted(os.listdir(tmp_path)) == [f"{MODULE}.py"]


def test_bad_model_arguments_and_inputs(capsys, user_module):
    rc, out, err = run(capsys, "inspect", "timm:resnet18", "--model-kwargs", "no_such_arg=1")
    assert_bad_input(rc, out, err, "cannot build timm:resnet18")
    rc, out, err = run(capsys, "inspect", "timm:resnet18", "--model-kwargs", "oops")
    assert_bad_input(rc, out, err, "NAME=VALUE")
    rc, out, err = run(capsys, "inspect", "timm:resnet18", "--input-size", "3,64")
    assert_bad_input(rc, out, err, "(1, 3, 64)", "--input-size")
    rc, out, err = run(capsys, "inspect", f"module:{user_module}:chain")
    assert_bad_input(rc, out, err, "--input-size")
    rc, out, err = run(capsys, "inspect", "keras:resnet")
    assert_bad_input(rc, out, err, "unknown kind 'keras'")
    rc, out, err = run(capsys, "inspect", "timm:resnet18", "--input-size", "3,x,4")  # argparse: usage + error
    assert rc == 2 and "C,H,W" in err and "Traceback" not in err


def test_wrong_rank_input(capsys):
    rc, out, err = run(capsys, "inspect", "timm:vit_tiny_patch16_224", "--input-size", "64")
    assert_bad_input(rc, out, err, "VisionTransformer takes 4-D inputs (batch, C, H, W), but the example input "
                                   "has shape (1, 64) (2-D)", "--input-size")
    assert "IndexError" not in err


def test_export_bad_input(capsys, tmp_path, ckpts):
    plain = ckpts["resnet18"][0]
    rc, out, err = run(capsys, "export", plain, "-o", tmp_path / "p.pth")
    assert_bad_input(rc, out, err, "is not a revwire file")
    rc, out, err = run(capsys, "export", tmp_path / "none.pt", "-o", tmp_path / "p.pth")
    assert_bad_input(rc, out, err, "not found")
    assert os.listdir(tmp_path) == []


def test_export_of_a_tampered_revwire_file(capsys, tmp_path, user_module):
    rc, out, err = run(capsys, "convert", f"module:{user_module}:chain", "--random-init", "--input-size", "8",
                       "-o", tmp_path / "rev.pt")
    assert rc == 0, err
    data = torch.load(tmp_path / "rev.pt", weights_only=True)
    torch.save(dict(data, format_version="x"), tmp_path / "bad.pt")
    rc, out, err = run(capsys, "export", tmp_path / "bad.pt", "-o", tmp_path / "p.pth")
    assert_bad_input(rc, out, err, "bad.pt: field 'format_version' must be an integer from 1 to 1, got 'x'")
    assert not (tmp_path / "p.pth").exists()


def test_torchvision_pretrained_offline(capsys, tmp_path, monkeypatch):
    import urllib.error

    import torchvision.models

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    rc, out, err = run(capsys, "convert", "torchvision:resnet18", "--pretrained", "-o", tmp_path / "o.pt")
    assert_bad_input(rc, out, err, "could not get the pretrained weights of torchvision:resnet18",
                     "--checkpoint PATH")
    assert os.listdir(tmp_path) == []


def test_python_m_revwire_pretrained_offline(tmp_path):
    """`python -m revwire` as a user runs it; timm's own pretrained loading fails offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "revwire", "convert", "timm:resnet18", "--pretrained", "-o", str(tmp_path / "o.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("revwire: error: could not get the pretrained weights of timm:resnet18")
    assert "--checkpoint PATH" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"] or sorted(os.listdir(tmp_path)) == []
