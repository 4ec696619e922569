"""Checkpointed segments (`checkpoint_rest`) against plain autograd of the same rewired model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revwire
from revwire.runtime.recompute import segments

from conftest import max_rel, rel

pytestmark = pytest.mark.usefixtures("small_cpu")
D = torch.float64


class Stem(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(F.relu(self.bn(self.conv(x))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class Down(nn.Module):
    """A block that changes the shape: stays ordinary, checkpointed with the option."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = Stem(c)
        self.layer1 = nn.Sequential(Block(c), Block(c), Block(c))
        self.down = Down(c)
        self.layer2 = nn.Sequential(Block(2 * c))  # one block: too short for a chain
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(self.layer2(self.down(self.layer1(self.stem(x))))), 1)))


def plain(rev):
    """The ground truth: the same rewired model with plain autograd everywhere."""
    revwire.set_engine(rev, "autograd")
    for s in segments(rev):
        s.recompute = False
    return rev


def step(model, x, seed=7):
    """One training step's outputs and gradients (same RNG draws for every model)."""
    torch.manual_seed(seed)
    xi = x.detach().clone().requires_grad_(True)
    out = model(xi)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["<input>"] = xi.grad
    return out.detach(), grads


def buffers(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def rewired(model, x):
    return revwire.rewire(model, x, checkpoint_rest=True)


def assert_match(model, x, steps=2):
    ref = plain(copy.deepcopy(model))
    for k in range(steps):
        out, grads = step(model, x, seed=k)
        out_ref, grads_ref = step(ref, x, seed=k)
        assert rel(out, out_ref) <= 1e-9
        assert max_rel(grads, grads_ref) <= 1e-7
        bufs, bufs_ref = buffers(model), buffers(ref)
        assert bufs.keys() == bufs_ref.keys()
        for n in bufs:
            torch.testing.assert_close(bufs[n], bufs_ref[n], rtol=0, atol=1e-12, msg=n)
        model.zero_grad(), ref.zero_grad()


def test_segments_match_plain_autograd_with_dropout_and_batchnorm():
    model = Net().to(D).train()
    x = torch.randn(4, 3, 8, 8, dtype=D)
    rev = rewired(model, x)
    assert [s.scope for s in revwire.report(rev).segments] == ["stem", "down", "layer2.0", "pool .. fc"]
    assert_match(rev, x)
    counts = {n: int(b) for n, b in rev.named_buffers() if n.endswith("num_batches_tracked")}
    assert set(counts.values()) == {2}  # two steps: each batch counted once, not twice


def test_dropout_masks_are_replayed():
    """Were the recompute to draw a new mask, the gradients would be those of another mask."""
    model = Net().to(D).train()
    x = torch.randn(4, 3, 8, 8, dtype=D)
    rev = rewired(model, x)
    _, grads = step(rev, x, seed=3)
    rev.zero_grad()
    _, other = step(plain(copy.deepcopy(rev)), x, seed=4)  # another mask
    _, same = step(plain(copy.deepcopy(rev)), x, seed=3)
    assert max_rel(grads, same) <= 1e-7 < max_rel(grads, other)


def test_resnet18_matches_plain_autograd():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).to(D).train()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    rev = rewired(model, x)
    rep = revwire.report(rev)
    assert [s.scope for s in rep.segments] == ["conv1 .. maxpool", "layer2.0", "layer2.1", "layer3.0",
                                               "layer3.1", "layer4.0", "layer4.1", "avgpool .. fc"]
    assert "checkpointed outside the stages (8)" in str(rep)
    assert_match(rev, x, steps=1)


def test_parameters_and_state_dict_keys_are_the_originals():
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    rev = rewired(model, x)
    assert [id(p) for p in rev.parameters()] == [id(p) for p in model.parameters()]
    assert list(rev.state_dict()) == list(model.state_dict())
    rev.load_state_dict(model.state_dict(), strict=True)


def test_saves_less_than_plain_autograd():
    model = Net(c=8).train()
    x = torch.randn(4, 3, 16, 16)
    rev = rewired(model, x)
    checkpointed = revwire.model_saved_bytes(rev, x)
    stored = revwire.model_saved_bytes(plain(copy.deepcopy(rev)), x)
    assert checkpointed < 0.5 * stored


def test_step_peak_below_checkpoint_per_block():
    """The step meter's activation peak of a training step: checkpoint_rest < checkpoint
    per residual block < plain (BatchNorm counters as plain autograd's)."""
    from revwire.tools.twins import checkpoint_twin

    model = Net(c=16).train()
    x, t = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    twins = {"vanilla": copy.deepcopy(model),
             "checkpoint": checkpoint_twin(copy.deepcopy(model), revwire.rewire(model, x)),
             "rest": rewired(copy.deepcopy(model), x)}
    peak = {k: revwire.train_step_peak(m, x, t).above_baseline for k, m in twins.items()}
    assert peak["rest"] < peak["checkpoint"] < peak["vanilla"], peak
    counted = {k: sum(int(b) for n, b in m.named_buffers() if n.endswith("num_batches_tracked"))
               for k, m in twins.items()}
    # 6 BatchNorms, 2 steps (warm-up and metered); checkpoint counts its 4 blocks' twice
    assert counted == {"vanilla": 12, "checkpoint": 20, "rest": 12}


def test_gradients_leave_through_autograd():
    """Hooks fire once, `autograd.grad` returns the parameters' gradients, `.grad` untouched."""
    model = Net().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    rev = rewired(model, x).eval()  # eval: no dropout, so two calls compute the same
    calls = {}
    handles = [p.register_hook(lambda g, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, p in rev.named_parameters() if n.startswith("stem.")]
    params = list(rev.parameters())
    grads = torch.autograd.grad(rev(x).sum(), params)
    assert all(g is not None for g in grads) and all(p.grad is None for p in params)
    assert calls and set(calls.values()) == {1}
    for h in handles:
        h.remove()
    # gradient accumulation: two backwards add up
    rev(x).sum().backward()
    rev(x).sum().backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, 2 * g)


def test_autocast_is_replayed():
    model = Net().train()
    x = torch.randn(4, 3, 8, 8)
    rev = revwire.set_engine(rewired(model, x), "autograd")  # only the segments differ
    ref = plain(copy.deepcopy(rev))
    results = []
    for m in (rev, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(step(m, x))
    assert results[0][0].dtype == torch.bfloat16
    assert max_rel(results[0][1], results[1][1]) <= 1e-6


def test_eval_and_no_grad_run_the_segment_plainly():
    model = Net().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    rev = rewired(model, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(rev(x), plain(copy.deepcopy(rev))(x), rtol=0, atol=0)
    assert all(not s.training for s in segments(rev))


def test_deepcopy_calls_the_copys_modules():
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    dup = copy.deepcopy(rewired(model, x))
    dup(x).sum().backward()
    assert dup.stem.conv.weight.grad is not None and model.stem.conv.weight.grad is None


def test_second_backward_raises():
    rev = rewired(Net(), torch.randn(2, 3, 8, 8))
    loss = rev(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


class NormStem(nn.Module):
    """Norms whose running statistics a naive recompute would update: cumulative-average
    BatchNorm (momentum=None reads num_batches_tracked) and a stat-tracking InstanceNorm."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c, momentum=None)
        self.inorm = nn.InstanceNorm2d(c, affine=True, track_running_stats=True)

    def forward(self, x):
        return self.inorm(torch.tanh(self.bn(self.conv(x))))  # tanh: BN stays visible to the grads


def test_cumulative_batchnorm_and_instancenorm_count_each_batch_once():
    model = Net().to(D).train()
    model.stem = NormStem(4).to(D)
    x = torch.randn(4, 3, 8, 8, dtype=D)
    rev = rewired(model, x)
    assert revwire.report(rev).segments[0].scope == "stem"
    assert_match(rev, x, steps=3)
    assert int(rev.stem.bn.num_batches_tracked) == 3
