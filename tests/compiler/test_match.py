"""Step 3 of the compiler: residual adds and chains (`revwire.match`), on tiny graphs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
import revwire

from revwire.compiler.match import match
from revwire.compiler.shapes import propagate
from revwire.compiler.trace import trace

D = 4

from conftest import TanhBranch as Branch


def analyse(model, *inputs, **kw):
    gm = trace(model, len(inputs))
    propagate(gm, inputs)
    return gm, match(gm, **kw)


def lengths(result):
    return [len(c.residuals) for c in result.chains]


def reasons(result):
    return " | ".join(s.reason for s in result.skipped)


class Plain(nn.Module):
    """n residual blocks x = x + F(x), optionally written in different styles."""

    def __init__(self, n=3, style="add"):
        super().__init__()
        self.blocks = nn.ModuleList(Branch() for _ in range(n))
        self.style = style

    def forward(self, x):
        for b in self.blocks:
            if self.style == "add":
                x = x + b(x)
            elif self.style == "radd":
                x = b(x) + x
            elif self.style == "iadd":
                y = b(x)
                y += x
                x = y
            elif self.style == "torch.add":
                x = torch.add(x, b(x))
        return x


@pytest.mark.parametrize("style", ["add", "radd", "iadd", "torch.add"])
def test_residual_styles_form_one_chain(style):
    gm, r = analyse(Plain(3, style), torch.randn(2, D))
    assert lengths(r) == [3]
    chain = r.chains[0]
    assert chain.input.op == "placeholder"
    for res in chain.residuals:
        assert res.act is None
        assert any(n.op == "call_module" for n in res.branch)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Branch()

    def forward(self, x, y):
        x = x + self.b(x) * y
        return x + self.b(x) * y


def test_branch_may_read_a_value_computed_before_the_block():
    # x_i = x_{i-2} + F(x_{i-1}, y) is still invertible: y reaches the stage as an input
    _, r = analyse(TwoInputs(), torch.randn(2, D), torch.randn(2, D))
    assert lengths(r) == [2]


def test_a_conditioning_input_gets_its_gradient_from_the_reversible_engine():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x, y = (torch.randn(2, D, dtype=torch.double, requires_grad=True) for _ in range(2))
    rev = revwire.rewire(model, (x, y))
    got = {}
    for engine in ("autograd", "reversible"):
        revwire.set_engine(rev, engine)
        got[engine] = torch.autograd.grad(rev(x, y).square().sum(), (x, y, model.b.fc.weight))
    for a, b in zip(got["autograd"], got["reversible"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_projection_shortcut_and_shape_change_are_not_residual():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, 2 * D)
            self.fc = nn.Linear(D, 2 * D)
            self.b = nn.ModuleList(Branch(2 * D) for _ in range(2))

        def forward(self, x):
            x = self.proj(x) + self.fc(x)  # projected shortcut
            for b in self.b:
                x = x + b(x)
            return x

    _, r = analyse(Down(), torch.randn(2, D))
    assert lengths(r) == [2]
    assert "projection shortcut" in reasons(r)


def test_post_activation_branch_and_skip():
    class PostAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(3))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            for b in self.b:
                x = self.relu(x + b(x))
            return x

    _, r = analyse(PostAct(), torch.randn(2, D))
    assert lengths(r) == [3]
    assert all(res.act is not None for res in r.chains[0].residuals)
    _, r = analyse(PostAct(), torch.randn(2, D), post_activation="skip")
    assert lengths(r) == []
    assert "post_activation='skip'" in reasons(r)
    with pytest.raises(ValueError, match="post_activation"):
        analyse(PostAct(), torch.randn(2, D), post_activation="nope")


def test_min_blocks():
    _, r = analyse(Plain(3), torch.randn(2, D), min_blocks=4)
    assert lengths(r) == []
    assert "chain too short (3 < min_blocks=4)" in reasons(r)
    _, r = analyse(Plain(1), torch.randn(2, D), min_blocks=1)
    assert lengths(r) == [1]


class Tapped(nn.Module):
    """4 blocks; the value after block `tap` is also returned (a feature tap)."""

    def __init__(self, tap=1):
        super().__init__()
        self.blocks = nn.ModuleList(Branch() for _ in range(4))
        self.tap = tap

    def forward(self, x):
        feats = None
        for i, b in enumerate(self.blocks):
            x = x + b(x)
            if i == self.tap:
                feats = x
        return x, feats


def test_feature_tap_cuts_the_chain():
    _, r = analyse(Tapped(tap=1), torch.randn(2, D))
    assert lengths(r) == [2, 2]
    _, r = analyse(Tapped(tap=0), torch.randn(2, D))
    assert lengths(r) == [3]  # [1] alone is below min_blocks
    assert "chain too short" in reasons(r)


def test_tap_inside_a_branch_is_not_residual():
    class InnerTap(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(3))

        def forward(self, x):
            h = self.b[0].fc(x)
            x = x + torch.tanh(h)
            x = x + self.b[1](x)
            x = x + self.b[2](x)
            return x, h

    _, r = analyse(InnerTap(), torch.randn(2, D))
    assert lengths(r) == [2]
    assert "tapped value" in reasons(r)


def test_in_place_add_is_left_alone():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(3))

        def forward(self, x):
            for b in self.b:
                y = b(x)
                y.add_(x)
                x = y
            return x

    _, r = analyse(InPlace(), torch.randn(2, D))
    assert lengths(r) == []
    assert "in-place add_" in reasons(r)


def test_layout_ops_between_blocks_continue_the_chain():
    class Layout(nn.Module):
        """Swin-like: blocks on (B, H*W, C) with reshapes to (B, H, W, C) in between."""

        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(4))

        def forward(self, x):  # x: (B, 3, 5, D)
            B, H, W, C = x.shape
            for i, b in enumerate(self.b):
                x = x.reshape(B, H * W, C)
                x = x + b(x)
                x = x.view(B, H, W, C)
                if i % 2:
                    x = torch.roll(x, shifts=1, dims=1)
            return x

    _, r = analyse(Layout(), torch.randn(2, 3, 5, D))
    assert lengths(r) == [4]
    assert all(len(t) >= 2 for t in r.chains[0].transitions)


def test_nested_residual_keeps_the_outer_chain():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Branch(), Branch()

        def forward(self, x):
            y = x + self.a(x)
            y = y + self.b(y)
            return torch.sin(y)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Inner() for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    _, r = analyse(Outer(), torch.randn(2, D))
    assert lengths(r) == [2]
    assert "nested inside another chain's branch" in reasons(r)


def test_add_of_unrelated_values_is_not_reported():
    class Unrelated(nn.Module):
        def forward(self, x, y):
            return x + y

    _, r = analyse(Unrelated(), torch.randn(2, D), torch.randn(2, D))
    assert lengths(r) == [] and r.skipped == []


def test_branch_mutating_the_skip_is_not_residual():
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(3))

        def forward(self, x):
            for b in self.b:
                x = x + F.relu(b(x.mul_(1.0)))
            return x

    _, r = analyse(Mutates(), torch.randn(2, D))
    assert lengths(r) == []
    assert "modifies the skip input in place" in reasons(r)


class PositionTable(nn.Module):
    """`x + pos.type_as(x)` (HF VideoMAE's embeddings), then residual blocks: the add reads x's
    dtype only, so it is no residual even where the example's batch of 1 gives it x's shape."""

    def __init__(self, n=2, how="type_as"):
        super().__init__()
        self.register_buffer("pos", torch.randn(1, 3, D))
        self.blocks = nn.ModuleList(Branch() for _ in range(n))
        self.how = how

    def forward(self, x):
        if self.how == "type_as":
            x = x + self.pos.type_as(x)
        elif self.how == "to":
            x = x + self.pos.to(x)
        else:
            x = x + torch.zeros_like(x)
        for b in self.blocks:
            x = x + b(x)
        return x


@pytest.mark.parametrize("how", ["type_as", "to", "zeros_like"])
def test_a_value_read_only_for_its_dtype_or_shape_is_no_branch_input(how):
    model = PositionTable(how=how)
    gm, result = analyse(model, torch.randn(1, 3, D))
    assert lengths(result) == [2]  # the blocks; before, [3]: the table add joined the chain
    assert [r.add.name for r in result.chains[0].residuals] == ["add_1", "add_2"]
    rev = revwire.rewire(model, torch.randn(1, 3, D))
    x = torch.randn(2, 3, D)  # another batch size: a table "block" would break here
    assert revwire.report(rev).chains[0].num_blocks == 2
    assert rev(x).shape == (2, 3, D)


def test_a_metadata_read_of_the_branchs_own_value_keeps_it_in_the_branch():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Branch() for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                h = b(x)
                x = x + h * torch.ones_like(h)  # ones_like reads h's shape: recomputed in the block
            return x

    model = Masked().double()
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    rev = revwire.rewire(model, x)
    assert revwire.report(rev).chains[0].num_blocks == 2
    assert revwire.verify(rev, x, tolerance=1e-10)["ok"]  # the block recomputes ones_like(h)
