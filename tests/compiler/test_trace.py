"""Step 1 of the compiler: `revwire.compiler.trace` / `RewireTracer` (docs/design.md §4)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import revwire
from revwire.compiler.trace import RewireTracer, reads_training_flag, trace

from conftest import TanhBranch as Branch


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class ModeDependent(nn.Module):
    """Its own forward branches on self.training (like a drop-path)."""

    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


class Net(nn.Module):
    def __init__(self, gate=False):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.b1 = Branch()
        self.b2 = Branch()
        self.drop = nn.Dropout(0.5)
        self.mode = ModeDependent()
        self.inner = nn.Sequential(nn.Identity(), Gate() if gate else nn.Identity())

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop(self.b1(x))
        x = self.inner(x)
        return x + self.mode(self.b2(x))


def _called_modules(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_trace_shares_module_and_parameter_objects():
    model = Net()
    gm = trace(model, 1)
    assert isinstance(gm, fx.GraphModule)
    assert gm.get_submodule("b1.fc") is model.b1.fc
    assert {id(p) for p in gm.parameters()} == {id(p) for p in model.parameters()}
    assert gm.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 4)
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_dropout_and_training_dependent_modules_are_leaves():
    gm = trace(Net(), 1)
    called = _called_modules(gm)
    assert "drop" in called and "mode" in called
    assert reads_training_flag(ModeDependent)
    assert not reads_training_flag(Branch)


def test_traced_model_follows_train_and_eval():
    model = Net()
    gm = trace(model.train(), 1)
    x = torch.randn(3, 4)
    gm.eval(), model.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    gm.train(), model.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(0)
    b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_identity_calls_are_inlined_but_stay_registered():
    model = Net()
    gm = trace(model, 1)
    assert not any(t.startswith("inner") for t in _called_modules(gm))
    assert isinstance(gm.get_submodule("inner.0"), nn.Identity)


class FunctionalDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.5, training=self.training)


def test_functional_dropout_reads_the_flag_at_run_time():
    model = FunctionalDrop().train()
    gm = trace(model, 1)  # traced in train mode
    x = torch.randn(8, 4)
    gm.eval()
    torch.testing.assert_close(gm(x), model.fc(x), rtol=0, atol=0)
    gm.train()
    assert not torch.equal(gm(x), model.fc(x))
    gm2 = trace(FunctionalDrop().eval(), 1)  # traced in eval mode, then trained
    gm2.train()
    y = gm2(torch.ones(64, 4))
    assert (y == 0).any()


class WithMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is None:
            return self.fc(x)
        return self.fc(x) * mask


def test_optional_arguments_are_traced_as_their_defaults():
    model = WithMask()
    gm = trace(model, 1)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_trace_error_names_the_module_path_and_the_fix():
    model = Net(gate=True)
    with pytest.raises(revwire.TraceError) as e:
        trace(model, 1)
    msg = str(e.value)
    assert "'inner.1'" in msg
    assert "leaf_modules=[Gate]" in msg
    assert isinstance(e.value, revwire.RewireError)


def test_leaf_modules_fix_the_trace():
    model = Net(gate=True)
    gm = trace(model, 1, leaf_modules=[Gate])
    assert "inner.1" in _called_modules(gm)
    x = torch.randn(2, 4)
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def sign_gate(x):
    if x.sum() > 0:
        return x
    return -x


class UsesFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return sign_gate(self.fc(x))


def test_autowrap_functions():
    # (torch.fx autowraps only names that do not start with "_".)
    model = UsesFunction()
    with pytest.raises(revwire.TraceError, match="<model forward>|''"):
        trace(model, 1)
    gm = trace(model, 1, autowrap_functions=[sign_gate])
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_timm_notrace_registrations_are_leaves():
    import timm
    from timm.layers import DropPath
    tracer = RewireTracer()
    assert tracer.is_leaf_module(DropPath(0.1), "blocks.0.drop_path")
    # timm's DropPath traced in train mode would freeze `bernoulli_` into the graph.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16,
                              depth=2, drop_path_rate=0.5)
    gm = trace(model.train(), 1)
    assert not any(n.target == "bernoulli_" for n in gm.graph.nodes)
    assert any(isinstance(gm.get_submodule(t), DropPath) for t in _called_modules(gm))


def test_torchvision_stochastic_depth_is_a_leaf():
    import torchvision.ops as tv_ops
    assert RewireTracer().is_leaf_module(tv_ops.StochasticDepth(0.1, "row"), "sd")
