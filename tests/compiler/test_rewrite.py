"""Step 4 of the compiler: the emitted ReversibleStage computes the re2tal coupling (docs/design.md §2)."""
import torch
import torch.nn.functional as F
from torch import fx, nn

import revwire

D = 4


from conftest import TanhBranch as Branch


class Net(nn.Module):
    """stem -> n residual blocks (optionally post-activated) -> head."""

    def __init__(self, n=4, post_act=False):
        super().__init__()
        self.stem = nn.Linear(3, D)
        self.blocks = nn.ModuleList(Branch() for _ in range(n))
        self.head = nn.Linear(D, 2)
        self.post_act = post_act

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
            if self.post_act:
                x = F.relu(x)
        return self.head(x)


def re2tal(x, branches):
    """x_i = x_{i-2} + F_i(x_{i-1}), x_{-1} = x_0 = x; output (x_{N-1} + x_N) / 2."""
    a = b = x
    for f in branches:
        a, b = b, a + f(b)
    return (a + b) / 2


def test_stage_computes_the_rewired_function():
    torch.manual_seed(0)
    model = Net(4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    expected = model.head(re2tal(model.stem(x), list(model.blocks)))
    for engine in ("autograd", "reversible"):
        revwire.set_engine(rev, engine)
        torch.testing.assert_close(rev(x), expected, rtol=1e-12, atol=1e-12)


def test_post_activation_moves_into_the_branch():
    torch.manual_seed(0)
    model = Net(3, post_act=True).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    assert revwire.report(rev).chains[0].post_activations == 3
    expected = model.head(re2tal(model.stem(x), [lambda t, b=b: F.relu(b(t)) for b in model.blocks]))
    torch.testing.assert_close(rev(x), expected, rtol=1e-12, atol=1e-12)


def test_a_moved_relu_passes_gradient_at_zero_so_zero_initialised_blocks_learn():
    # NOTE [ A moved ReLU ]: resnet18(zero_init_residual=True) starts each block's last
    # BatchNorm at 0, so a rewired block computes relu(0); torch's relu'(0) = 0 would leave
    # the norm at zero for good.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, zero_init_residual=True, num_classes=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    chained = [scope for c in revwire.report(rev).chains for scope in c.block_scopes]
    assert chained == ["layer1.0", "layer1.1"]
    rev(x).sum().backward()
    for name in chained:
        bn2 = model.get_submodule(name).bn2
        assert not bn2.weight.any() and bn2.weight.grad.abs().sum() > 0, name
    assert revwire.verify(rev, x, tolerance=1e-10)["ok"]
    # the same values as relu; derivative 1 at 0
    y = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    from revwire.compiler.rewrite import branch_relu

    out = branch_relu(y)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0, 2.0] and y.grad.tolist() == [0.0, 1.0, 1.0]


def test_first_block_is_exact_and_the_rest_differ():
    torch.manual_seed(0)
    model = Net(1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rev = revwire.rewire(model, x, min_blocks=1)
    h = model.stem(x)
    x1 = h + model.blocks[0](h)  # exact first block; output is (x_0 + x_1) / 2
    torch.testing.assert_close(rev(x), model.head((h + x1) / 2))


def test_rewired_graph_calls_one_stage_and_the_same_modules():
    model = Net(4)
    rev = revwire.rewire(model, torch.randn(2, 3))
    assert isinstance(rev, fx.GraphModule)
    called = [n.target for n in rev.graph.nodes if n.op == "call_module"]
    assert called == ["stem", "revwire_stage0", "head"]
    stage = rev.get_submodule("revwire_stage0")
    assert isinstance(stage, revwire.ReversibleStage)
    assert len(stage.blocks) == 4
    for i, block in enumerate(stage.blocks):
        assert block.get_submodule(f"blocks.{i}.fc") is model.blocks[i].fc
    # The blocks are not registered under the stage: parameter names stay the model's.
    assert not any(name.startswith("revwire_stage0.") for name, _ in rev.named_parameters())


def test_layout_transitions_are_applied_to_both_streams():
    class Layout(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(Branch() for _ in range(3))

        def forward(self, x):  # (B, H, W, C)
            B, H, W, C = x.shape
            for i, b in enumerate(self.b):
                x = x.reshape(B, H * W, C)
                x = x + b(x)
                x = torch.roll(x.view(B, H, W, C), shifts=1, dims=1)
            return x

    torch.manual_seed(0)
    model = Layout().double()
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    rep = revwire.report(rev)
    assert [c.num_blocks for c in rep.chains] == [3] and rep.chains[0].transitions == 2

    def flat(t):
        return t.reshape(2, 15, D)

    def unflat(t):
        return torch.roll(t.view(2, 3, 5, D), shifts=1, dims=1)

    a = b = flat(x)
    for i, blk in enumerate(model.b):
        a, b = b, a + blk(b)
        if i < 2:
            a, b = flat(unflat(a)), flat(unflat(b))
    expected = unflat((a + b) / 2)
    for engine in ("autograd", "reversible"):
        revwire.set_engine(rev, engine)
        xi = x.clone().requires_grad_(True)
        out = rev(xi)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        out.sum().backward()
        g = xi.grad
        if engine == "autograd":
            g_ag = g
    torch.testing.assert_close(g, g_ag, rtol=1e-10, atol=1e-12)


def test_two_chains_two_stages():
    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList(Branch() for _ in range(2))
            self.down = nn.Linear(D, 2 * D)
            self.b = nn.ModuleList(Branch(2 * D) for _ in range(3))

        def forward(self, x):
            for m in self.a:
                x = x + m(x)
            x = self.down(x)
            for m in self.b:
                x = x + m(x)
            return x

    rev = revwire.rewire(TwoStages(), torch.randn(2, D))
    rep = revwire.report(rev)
    assert [c.num_blocks for c in rep.chains] == [2, 3]
    assert [c.shape for c in rep.chains] == [[2, D], [2, 2 * D]]
    assert [s.name for s in revwire.stages(rev)] == ["revwire_stage0", "revwire_stage1"]


def test_feature_tap_model_keeps_its_outputs():
    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Branch() for _ in range(6))

        def forward(self, x):
            feats = []
            for i, b in enumerate(self.blocks):
                x = x + b(x)
                if i in (2, 5):
                    feats.append(x)
            return feats

    torch.manual_seed(0)
    model = Tapped().double()
    x = torch.randn(2, D, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    assert [c.num_blocks for c in revwire.report(rev).chains] == [3, 3]
    f1, f2 = rev(x)
    e1 = re2tal(x, list(model.blocks[:3]))
    torch.testing.assert_close(f1, e1)
    torch.testing.assert_close(f2, re2tal(e1, list(model.blocks[3:])))


class SharedTable(nn.Module):
    """Every block reads a table computed once before them (like a rotary embedding or a
    mask), and the shape of the input read once at the top (`B, N, C = x.shape`)."""

    def __init__(self, d=8, depth=4):
        super().__init__()
        self.freq = nn.Parameter(torch.randn(d))
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x, mask=None):
        B, N, C = x.shape
        table = torch.sin(self.freq * torch.arange(N, dtype=x.dtype, device=x.device)[:, None])
        for fc in self.fcs:
            y = fc(x) * table
            x = x + y.reshape(B, N, C)
        return x


def test_values_computed_before_the_chain_reach_every_block_with_their_gradients():
    torch.manual_seed(0)
    model = SharedTable().double()
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    rev = revwire.rewire(model, x)
    assert [c.num_blocks for c in revwire.report(rev).chains] == [4]
    grads = {}
    for engine in ("autograd", "reversible"):
        revwire.set_engine(rev, engine)
        x.grad = None
        rev.zero_grad(set_to_none=True)
        out = rev(x)
        out.square().sum().backward()
        grads[engine] = (out.detach(), x.grad.clone(), model.freq.grad.clone(), model.fcs[2].weight.grad.clone())
    for a, b in zip(grads["autograd"], grads["reversible"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert grads["reversible"][2].abs().sum() > 0  # the shared table's parameter gets its gradient
    # and the shapes are read at run time, not frozen at the example's
    longer = torch.randn(3, 7, 8, dtype=torch.double)
    revwire.set_engine(rev, "reversible")
    assert rev(longer).shape == (3, 7, 8)


def test_only_the_last_stage_keeps_its_last_block():
    # an earlier stage holding a block's activations would hold them while later stages run
    import timm
    rev = revwire.rewire(timm.create_model("resnet50", pretrained=False), torch.randn(1, 3, 32, 32))
    assert [s.keep_last for s in revwire.stages(rev)] == [False, False, False, True]
