"""Step 2b of the compiler: traced idioms back to the ops eager runs (`compiler/normalize.py`)."""
import operator

import torch
from torch import nn

from revwire.compiler.normalize import unbind_unpacked_tensors
from revwire.compiler.shapes import info, propagate
from revwire.compiler.trace import trace


class Unpacks(nn.Module):
    def __init__(self, n_read=3):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.n_read = n_read

    def forward(self, x):
        t = self.qkv(x).reshape(-1, 3, 4).permute(1, 0, 2)
        if self.n_read == 3:
            q, k, v = t
            return q * k + v
        return t[0] * t[1]  # only two of the three: not an unpacking


def _normalized(model, x):
    gm = trace(model, 1)
    propagate(gm, (x,))
    return gm, unbind_unpacked_tensors(gm)


def test_unpacking_becomes_one_unbind_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    model, x = Unpacks().double(), torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gm, n = _normalized(model, x)
    assert n == 1
    (unbind,) = [node for node in gm.graph.nodes if node.target is torch.unbind]
    assert sorted(u.args[1] for u in unbind.users) == [0, 1, 2]
    assert all(u.target is operator.getitem and info(u).shape == (5, 4) for u in unbind.users)
    ref = model(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    out = gm(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, ref) and torch.equal(g, g_ref)
    # the backward allocates no zero tensor of t's full size per element (SelectBackward)
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(nxt for nxt, _ in fn.next_functions)
    assert "UnbindBackward0" in names and "SelectBackward0" not in names


def test_partial_reads_are_left_alone():
    gm, n = _normalized(Unpacks(n_read=2), torch.randn(5, 4))
    assert n == 0 and not any(node.target is torch.unbind for node in gm.graph.nodes)


def test_assert_messages_show_the_run_time_values():
    import io

    import pytest
    import timm

    import revwire
    from revwire.errors import InputError

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    with pytest.raises(InputError, match=r"Input height \(64\) doesn't match model \(224\)"):
        revwire.rewire(model, torch.randn(1, 3, 64, 64))
    rev = revwire.rewire(model, torch.randn(1, 3, 224, 224), min_blocks=1)
    with pytest.raises(AssertionError, match=r"^Input height \(96\) doesn't match model \(224\)\.$"):
        rev(torch.randn(1, 3, 96, 224))
    buf = io.BytesIO()
    torch.save(rev, buf)  # a GraphModule is re-traced when unpickled: the assert must trace
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(AssertionError, match=r"Input width \(32\) doesn't match model \(224\)"):
        loaded(torch.randn(1, 3, 224, 32))
    assert loaded(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
