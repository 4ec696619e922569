"""The `checkpoint_rest` pass (compiler/segments.py): which runs become segments, and why not."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revwire
from revwire.runtime.recompute import CheckpointedSegment, segments
from revwire.tools.cli import main


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Tapped(nn.Module):
    """The stem's output is also read by the head (a value read across segments)."""

    def __init__(self, d=8):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.blocks = nn.Sequential(Block(d), Block(d), Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.blocks(s) + s)


class InPlaceHead(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x.mul_(0.5)
        return self.head(x)


def test_off_by_default_and_in_the_report():
    model = Tapped()
    x = torch.randn(2, 4)
    assert not segments(revwire.rewire(model, x))
    rev = revwire.rewire(model, x, checkpoint_rest=True)
    rep = revwire.report(rev)
    assert [s.scope for s in rep.segments] == ["stem"] and rep.segments[0].shape == [2, 4]
    assert isinstance(rev.get_submodule(rep.segments[0].name), CheckpointedSegment)
    # the head reads the stage's output and the stem's: left as it is, and reported
    (reason,) = [s.reason for s in rep.skipped if s.reason.startswith("not checkpointed")]
    assert "reads 2 values" in reason
    assert "checkpointed outside the stages (1): revwire_segment0 [stem]" in str(rep)
    assert rep.to_dict()["segments"][0]["scope"] == "stem"
    torch.testing.assert_close(rev(x), revwire.rewire(model, x)(x))


def test_a_run_that_writes_into_its_input_is_left_alone():
    rep = revwire.report(revwire.rewire(InPlaceHead(), torch.randn(2, 4), checkpoint_rest=True))
    assert [s.scope for s in rep.segments] == ["stem"]
    assert any("modifies its input" in s.reason for s in rep.skipped)


def test_no_stage_keeps_its_last_block_with_the_option():
    x = torch.randn(2, 4)
    assert revwire.stages(revwire.rewire(Tapped(), x))[0].keep_last
    assert not revwire.stages(revwire.rewire(Tapped(), x, checkpoint_rest=True))[0].keep_last


def test_save_and_load_keep_the_option(tmp_path):
    pytest.importorskip("torchvision")
    model = revwire.build_model("torchvision:resnet18", {"num_classes": 4})
    x = torch.randn(1, 3, 32, 32)
    rev = revwire.rewire(model, x, checkpoint_rest=True)
    path = tmp_path / "r.revwire"
    revwire.save(rev, path)
    back = revwire.load(path)
    assert revwire.report(back).to_dict()["segments"] == revwire.report(rev).to_dict()["segments"]
    assert back.revwire_options.checkpoint_rest


def test_cli_flag(capsys):
    rc = main(["inspect", "torchvision:resnet18", "--input-size", "3,64,64", "--batch", "2", "--checkpoint-rest", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert data["rewire_options"]["checkpoint_rest"] is True
    assert [s["scope"] for s in data["report"]["segments"]][:2] == ["conv1 .. maxpool", "layer2.0"]
