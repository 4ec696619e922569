"""Checkpoints: timm-style reading, strict loading, atomic writes, save / load / export."""
import argparse
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import revwire
from conftest import perturb_weights
from revwire.tools import checkpoint as ckpt
from revwire.errors import CheckpointError, OutputError

MODULE = "revwire_ckpt_models"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A small residual model (with BatchNorm and a leaf module) in an importable file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):  # untraceable: control flow on a tensor value
            def forward(self, x):
                return x if bool(x.abs().sum() >= 0) else -x

        def identity(x):  # a function to name in autowrap_functions
            return x

        class Block(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.fc = nn.Linear(width, width)
                self.bn = nn.BatchNorm1d(width)
                self.gate = Gate()

            def forward(self, x):
                return torch.tanh(self.bn(self.fc(self.gate(x))))

        class Net(nn.Module):
            def __init__(self, width=8, depth=4, classes=3):
                super().__init__()
                self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
                self.head = nn.Linear(width, classes)

            def forward(self, x):
                for b in self.blocks:
                    x = x + b(x)
                return self.head(x)
    """))
    monkeypatch.syspath_prepend(str(src))
    return f"module:{MODULE}:Net"


def _randomize(model, seed=0):
    return perturb_weights(model, seed, scale=0.3, replace=True)


def _rewired(spec, **kwargs):
    from importlib import import_module

    model = _randomize(revwire.build_model(spec, kwargs))
    gate = import_module(MODULE).Gate
    rev = revwire.rewire(model, torch.randn(4, kwargs.get("width", 8)), leaf_modules=(gate,))
    return model, rev


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- reading


def test_read_state_dict_timm_layouts(tmp_path):
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sd = m.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    cases = {
        "bare.pth": (sd, ""),
        "wrapped.pth": ({"state_dict": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, "state_dict"),
        "model.pth": ({"model": sd, "optimizer": {}}, "model"),
        "ddp.pth": ({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, "state_dict"),
        "compiled.pth": ({f"_orig_mod.module.{k}": v for k, v in sd.items()}, ""),
    }
    for name, (obj, key) in cases.items():
        torch.save(obj, tmp_path / name)
        got, where = ckpt.read_state_dict(tmp_path / name)
        assert where == key and _sd_equal(got, sd), name
    # EMA weights are preferred, as timm does, unless use_ema=False.
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "ema.pth")
    got, where = ckpt.read_state_dict(tmp_path / "ema.pth")
    assert where == "state_dict_ema" and _sd_equal(got, ema)
    got, where = ckpt.read_state_dict(tmp_path / "ema.pth", use_ema=False)
    assert where == "state_dict" and _sd_equal(got, sd)
    # safetensors, with and without the extension.
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert _sd_equal(ckpt.read_state_dict(tmp_path / "w.safetensors")[0], sd)
    os.rename(tmp_path / "w.safetensors", tmp_path / "w.bin")
    assert _sd_equal(ckpt.read_state_dict(tmp_path / "w.bin")[0], sd)


class _Pickled:
    pass


@pytest.mark.parametrize("case, words", [
    ("missing", "not found"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("garbage", "not a readable PyTorch or safetensors file"),
    ("truncated", "not a readable PyTorch or safetensors file"),
    ("truncated_safetensors", "not a valid safetensors file"),
    ("pickled_object", "save its state_dict instead"),
    ("not_a_state_dict", "no state_dict \\(top-level keys: 'epoch', 'lr'\\)"),
    ("a_list", "holds a list, not a state_dict"),
])
def test_read_bad_checkpoints(tmp_path, case, words):
    path = tmp_path / f"{case}.pth"
    sd = nn.Linear(64, 64).state_dict()
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"GARBAGE" + random.Random(0).randbytes(1000))  # not a pickle opcode first
    elif case == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "truncated_safetensors":
        path = tmp_path / "t.safetensors"
        save_file(sd, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "pickled_object":
        torch.save({"state_dict": sd, "extra": _Pickled()}, path)
    elif case == "not_a_state_dict":
        torch.save({"epoch": 1, "lr": 0.1}, path)
    elif case == "a_list":
        torch.save([1, 2], path)
    before = _digest(path) if path.is_file() else None
    with pytest.raises(CheckpointError, match=words):
        ckpt.read_state_dict(path)
    if before is not None:
        assert _digest(path) == before


def test_load_weights_strict_with_key_listing(tmp_path):
    r18 = revwire.build_model("timm:resnet18", {"num_classes": 10})
    torch.save(r18.state_dict(), tmp_path / "r18.pth")
    # Another architecture: keys listed, the model is left as it was.
    r34 = revwire.build_model("timm:resnet34", {"num_classes": 10})
    before = {k: v.clone() for k, v in r34.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not match timm:resnet34: missing keys: layer1\.2\.conv1\.weight.*"
                                              r"\(\d+ in all\)"):
        ckpt.load_weights(r34, tmp_path / "r18.pth")
    assert _sd_equal(r34.state_dict(), before)
    # Same architecture, other num_classes: mis-shaped keys with both shapes.
    other = revwire.build_model("timm:resnet18", {"num_classes": 7})
    with pytest.raises(CheckpointError, match=r"mis-shaped: fc\.weight \(10x512 in file, 7x512 in model\)"):
        ckpt.load_weights(other, tmp_path / "r18.pth")
    # Unexpected keys.
    torch.save(dict(r18.state_dict(), **{"extra.weight": torch.ones(1)}), tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        ckpt.load_weights(revwire.build_model("timm:resnet18", {"num_classes": 10}), tmp_path / "extra.pth")
    # And the right one loads.
    fresh = revwire.build_model("timm:resnet18", {"num_classes": 10})
    assert ckpt.load_weights(fresh, tmp_path / "r18.pth") == ""
    assert _sd_equal(fresh.state_dict(), r18.state_dict())


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_refuses_existing_and_keeps_it(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; pass --force"):
        ckpt.atomic_write(out, lambda tmp: open(tmp, "wb").write(b"new"))
    assert out.read_bytes() == b"precious"
    ckpt.atomic_write(out, lambda tmp: open(tmp, "wb").write(b"new"), overwrite=True)
    assert out.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.pt"]
    assert (out.stat().st_mode & 0o777) == (0o666 & ~ckpt._umask())


def test_atomic_write_failure_leaves_nothing_behind(tmp_path):
    def fails(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(OutputError, match="cannot write .*new.pt: disk full"):
        ckpt.atomic_write(tmp_path / "new.pt", fails)
    assert os.listdir(tmp_path) == []
    (tmp_path / "old.pt").write_bytes(b"old")
    with pytest.raises(OutputError):
        ckpt.atomic_write(tmp_path / "old.pt", fails, overwrite=True)
    assert os.listdir(tmp_path) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"old"


def test_atomic_write_never_clobbers_a_file_created_meanwhile(tmp_path):
    out = tmp_path / "out.pt"

    def racing(tmp):
        open(tmp, "wb").write(b"mine")
        out.write_bytes(b"theirs")

    with pytest.raises(OutputError, match="exists"):
        ckpt.atomic_write(out, racing)
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.pt"]


def test_unwritable_outputs(tmp_path, monkeypatch):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError, match="does not exist"):
        ckpt.check_output_path(tmp_path / "nodir" / "out.pt")
    with pytest.raises(OutputError, match="is not a directory"):
        ckpt.check_output_path(tmp_path / "file" / "out.pt")
    with pytest.raises(OutputError, match="is a directory"):
        ckpt.check_output_path(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="is the input file"):
        ckpt.check_output_path(tmp_path / "file", overwrite=True, inputs=[tmp_path / "file"])

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match="cannot write .*out.pt: Permission denied"):
        ckpt.atomic_write(tmp_path / "out.pt", lambda tmp: None)


# --------------------------------------------------------------------------- save / load / export


def test_save_load_round_trip(tmp_path, user_module):
    model, rev = _rewired(user_module, width=8, depth=4)
    path = tmp_path / "rev.pt"
    revwire.save(rev, path)
    # Only JSON-able metadata and tensors: weights_only loading works.
    data = torch.load(path, weights_only=True)
    assert _sd_equal(data["state_dict"], model.state_dict())
    assert data["spec"] == user_module and data["format"] == "revwire"
    assert data["revwire_version"] == revwire.__version__
    assert data["input_shapes"] == [[4, 8]]
    assert data["rewire_options"]["leaf_modules"] == [f"{MODULE}:Gate"]
    assert data["rewire_options"]["min_blocks"] == 2 and data["engine"] == "reversible"

    # A module: spec and a user leaf module are code the file names: loading needs trust_code=True.
    with pytest.raises(CheckpointError, match=rf"names code to import and call \({user_module}, {MODULE}:Gate\)"):
        revwire.load(path)
    rev2 = revwire.load(path, trust_code=True)
    assert _sd_equal(rev2.state_dict(), rev.state_dict())
    assert [len(s.blocks) for s in revwire.stages(rev2)] == [4]
    assert revwire.report(rev2).to_dict()["chains"] == revwire.report(rev).to_dict()["chains"]
    x = torch.randn(5, 8)
    for mode in ("eval", "train"):
        getattr(rev, mode)(), getattr(rev2, mode)()
        torch.testing.assert_close(rev2(x), rev(x), rtol=0, atol=0)
    # The same file loads into the original architecture with timm's loader (it picks 'state_dict').
    from timm.models import load_checkpoint

    plain = revwire.build_model(user_module)
    load_checkpoint(plain, str(path), strict=True)
    assert _sd_equal(plain.state_dict(), data["state_dict"])


def test_save_load_keeps_engine_and_options(tmp_path, user_module):
    model = _randomize(revwire.build_model(user_module, {"depth": 3}))
    gate = __import__(MODULE).Gate
    rev = revwire.rewire(model, torch.randn(2, 8), leaf_modules=(gate,), min_blocks=3,
                         stream_dtype=torch.float64)
    revwire.set_engine(rev, "autograd")
    revwire.save(rev, tmp_path / "rev.pt")
    rev2 = revwire.load(tmp_path / "rev.pt", trust_code=True)
    (stage,) = revwire.stages(rev2)
    assert stage.engine == "autograd" and stage.stream_dtype == torch.float64
    assert rev2.revwire_options == rev.revwire_options
    assert rev2.revwire_options.min_blocks == 3 and rev2.revwire_options.leaf_modules == (gate,)


def test_every_option_survives_a_file(tmp_path, user_module):
    from test_options import non_default_options

    mod = __import__(MODULE)
    options = non_default_options(leaf_modules=(mod.Gate,), autowrap_functions=(mod.identity,))
    model = _randomize(revwire.build_model(user_module))
    rev = revwire.rewire(model, torch.randn(4, 8), options)
    revwire.save(rev, tmp_path / "rev.pt")
    assert revwire.load(tmp_path / "rev.pt", trust_code=True).revwire_options == options


def test_save_needs_a_spec(tmp_path, user_module):
    plain = _randomize(__import__(MODULE).Net())  # built without revwire.build_model
    gate = __import__(MODULE).Gate
    rev = revwire.rewire(plain, torch.randn(2, 8), leaf_modules=(gate,))
    with pytest.raises(CheckpointError, match="cannot tell how to rebuild this model"):
        revwire.save(rev, tmp_path / "rev.pt")
    assert not (tmp_path / "rev.pt").exists()
    revwire.save(rev, tmp_path / "rev.pt", spec=user_module)
    assert _sd_equal(revwire.load(tmp_path / "rev.pt", trust_code=True).state_dict(), plain.state_dict())
    with pytest.raises(CheckpointError, match="not made by revwire.rewire"):
        revwire.save(plain, tmp_path / "x.pt", spec=user_module)
    with pytest.raises(OutputError, match="exists"):
        revwire.save(rev, tmp_path / "rev.pt", spec=user_module, overwrite=False)


def test_load_refuses_other_files(tmp_path, user_module):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="is not a revwire file"):
        revwire.load(tmp_path / "plain.pth")
    model, rev = _rewired(user_module)
    revwire.save(rev, tmp_path / "rev.pt")
    data = torch.load(tmp_path / "rev.pt", weights_only=True)
    torch.save(dict(data, format_version=99), tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer format"):
        revwire.load(tmp_path / "future.pt", trust_code=True)
    sd = dict(data["state_dict"])
    sd.pop("head.bias")
    torch.save(dict(data, state_dict=sd), tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: head\.bias"):
        revwire.load(tmp_path / "broken.pt", trust_code=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_state_dict(tmp_path, user_module, suffix):
    model, rev = _rewired(user_module)
    revwire.save(rev, tmp_path / "rev.pt")
    before = _digest(tmp_path / "rev.pt")
    out = tmp_path / f"plain{suffix}"
    assert revwire.export_state_dict(tmp_path / "rev.pt", out) == len(model.state_dict())
    fresh = revwire.build_model(user_module)
    fresh.load_state_dict(ckpt.read_state_dict(out)[0], strict=True)
    assert _sd_equal(fresh.state_dict(), model.state_dict())
    assert _digest(tmp_path / "rev.pt") == before
    with pytest.raises(OutputError, match="exists"):
        revwire.export_state_dict(tmp_path / "rev.pt", out)
    with pytest.raises(OutputError, match="is the input file"):
        revwire.export_state_dict(tmp_path / "rev.pt", tmp_path / "rev.pt", overwrite=True)
    assert _digest(tmp_path / "rev.pt") == before


# --------------------------------------------------------------------------- hostile revwire files


@pytest.fixture
def saved(tmp_path, user_module):
    """The metadata of a valid revwire file of the user module's model."""
    _, rev = _rewired(user_module)
    revwire.save(rev, tmp_path / "rev.pt")
    return torch.load(tmp_path / "rev.pt", weights_only=True)


_HUGE = [1, 8, 10**7, 10**7]  # 8e14 elements: 3.2e15 bytes of float32


@pytest.mark.parametrize("field, value, words", [
    ("format_version", "x", "must be an integer from 1 to 1, got 'x'"),
    ("format_version", None, "must be an integer from 1 to 1, got None"),
    ("format_version", True, "must be an integer from 1 to 1, got True"),
    ("format_version", 0, "must be an integer from 1 to 1, got 0"),
    ("format_version", 99, "is 99: the file was written by revwire .* in a newer format; upgrade revwire"),
    ("revwire_version", 5, "must be a string, got 5"),
    ("spec", 5, "invalid model spec 5"),
    ("spec", "keras:resnet", "unknown kind 'keras'"),
    ("model_kwargs", [1, 2], "must be a dict of constructor arguments, got a list"),
    ("model_kwargs", {1: 2}, "must be a dict of constructor arguments, got a key 1"),
    ("model_kwargs", {"no_such_arg": 1}, "fields 'spec' and 'model_kwargs' do not build a model: cannot build"),
    ("input_shapes", "abc", "must be a non-empty list of shapes"),
    ("input_shapes", [], "must be a non-empty list of shapes"),
    ("input_shapes", [[4, -8]], r"input_shapes\[0\]' must be a list of 1 to 8 positive integers, got \[4, -8\]"),
    ("input_shapes", [[4, 8.5]], r"input_shapes\[0\]' must be a list of 1 to 8 positive integers"),
    ("input_shapes", [[True, 8]], r"input_shapes\[0\]' must be a list of 1 to 8 positive integers"),
    ("input_shapes", [_HUGE], r"input_shapes\[0\]' asks for 800,000,000,000,000 elements; at most 134,217,728 in all"),
    ("input_shapes", [[4, 8]] * 3 + [[2**26, 2]], r"input_shapes\[3\]' asks for 134,217,728 elements \(134,217,824 with the inputs before it\); at most"),
    ("input_shapes", [[4, 16]], "the model does not accept inputs of these shapes"),
    ("rewire_options", "fast", "must be a dict, got a str"),
    ("rewire_options", {"turbo": True}, r"unknown rewire option\(s\) \['turbo'\]"),
    ("rewire_options", {"min_blocks": "2"}, "min_blocks must be an integer >= 1, got '2'"),
    ("rewire_options", {"engine": "fast"}, "engine must be one of"),
    ("rewire_options", {"leaf_modules": [3]}, "leaf_modules must be a list of 'package.module:Name'"),
    ("rewire_options", {"min_blocks": 99}, "does not rewire its model: no chain of >= 99"),
    ("engine", "fast", r"must be one of \('reversible', 'autograd'\) or None, got 'fast'"),
    ("engine", 3, r"must be one of \('reversible', 'autograd'\) or None, got 3"),
    ("dtype", "int64", r"must be one of \('float32', 'float64', 'float16', 'bfloat16'\), got 'int64'"),
    ("dtype", "nope", r"must be one of .*, got 'nope'"),
    ("state_dict", [1, 2], "must be a dict of tensors, got a list"),
    ("state_dict", {"head.bias": 1}, "must be a dict of tensors, got 'head.bias': int"),
    ("state_dict", {}, "is empty"),
    ("state_dict", {"head.bias": torch.ones(3).to_sparse()}, "holds 'head.bias', a torch.sparse_coo torch.float32 "
                                                             "tensor: only dense real tensors"),
    ("state_dict", {"head.bias": torch.ones(3, dtype=torch.complex64)}, "a torch.strided torch.complex64 tensor"),
])
def test_load_refuses_hostile_fields(tmp_path, saved, field, value, words):
    """Each bad field is a CheckpointError naming the file and the field, before any
    allocation of the stored input size."""
    path = tmp_path / "bad.pt"
    if field == "rewire_options" and isinstance(value, dict):
        value = dict(saved["rewire_options"], **value)  # one option tampered with
    torch.save(dict(saved, **{field: value}), path)
    with pytest.raises(CheckpointError) as e:
        revwire.load(path, trust_code=True)
    message = str(e.value)
    assert message.startswith(f"revwire file {path}: field") and f"'{field}" in message, message
    assert re.search(words, message), message


@pytest.mark.parametrize("field", ["format_version", "spec", "state_dict", "rewire_options", "input_shapes"])
def test_load_refuses_incomplete_files(tmp_path, saved, field):
    path = tmp_path / "bad.pt"
    torch.save({k: v for k, v in saved.items() if k != field}, path)
    with pytest.raises(CheckpointError, match=rf"revwire file .*bad.pt is incomplete: it has no '{field}'"):
        revwire.load(path, trust_code=True)


# --------------------------------------------------------------------------- signals while writing

_CHILD = """
import signal, sys
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a job scheduler's child has them
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch, revwire
from revwire.tools import checkpoint, cli

def blocked_save(obj, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"partial")
    with open(int(ready), "w") as pipe:  # the temporary file exists: the parent may signal now
        pipe.write(f)
    sys.stdin.read()  # blocks until the signal arrives (the parent never closes stdin)
    raise AssertionError("not signalled")

torch.save = blocked_save
ready, command, out = sys.argv[1:4]
if command == "save":
    from revwire_ckpt_models import Gate, Net
    rev = revwire.rewire(Net(), torch.randn(2, 8), leaf_modules=(Gate,))
    revwire.save(rev, out, spec="module:revwire_ckpt_models:Net")
else:
    sys.exit(cli.main([command, *sys.argv[4:], "-o", out]))
"""


@pytest.mark.parametrize("command, sig, status", [
    ("save", "SIGTERM", 143),
    ("save", "SIGINT", 1),  # an uncaught KeyboardInterrupt
    ("convert", "SIGTERM", 143),
    ("convert", "SIGINT", 130),
    ("export", "SIGTERM", 143),
])
def test_signal_while_writing_leaves_no_file(tmp_path, user_module, command, sig, status):
    """SIGTERM (what `timeout` and job schedulers send) and SIGINT in the middle of a write:
    the temporary file is removed, the output never appears. The child blocks inside its
    (patched) torch.save until the signal comes: no sleeps."""
    src = tmp_path / "src"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = []
    if command == "convert":
        args = [user_module, "--random-init", "--input-size", "8", "--leaf-module", f"{MODULE}:Gate"]
    elif command == "export":
        revwire.save(_rewired(user_module)[1], tmp_path / "rev.pt")
        args = [str(tmp_path / "rev.pt")]
    out = out_dir / "o.pt"
    root = os.path.dirname(os.path.dirname(revwire.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(src)]), OMP_NUM_THREADS="1")
    ready, ready_w = os.pipe()
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ready_w), command, str(out), *args], env=env,
                                cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                pass_fds=(ready_w,))
        os.close(ready_w)
        try:
            with os.fdopen(ready) as pipe:
                tmp = pipe.read()  # until the child closes it: inside the write, or dead
            assert tmp, (tmp_path / "stderr").read_text()
            assert os.listdir(out_dir) == [os.path.basename(tmp)] and tmp.endswith(".tmp")
            proc.send_signal(getattr(signal, sig))
            proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()
    assert os.listdir(out_dir) == []
    assert proc.returncode == status, (tmp_path / "stderr").read_text()
    if command == "convert" and sig == "SIGINT":
        assert (tmp_path / "stderr").read_text().strip().splitlines()[-1] == "revwire: interrupted"
