"""The front end: the leaf rule, `not_leaf`, decorated forwards, structured inputs, and the
concrete capture that resolves shape control flow from the example inputs."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revwire
from revwire.compiler.trace import RewireTracer, bind_inputs, reads_training_flag, trace

from _frontend_check import check_rewire
from conftest import TanhBranch as Branch


def keeps_defaults(forward):
    """A transformers-style decorator: `wrapper(self, *args, **kwargs)` around forward."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.setdefault("scale", 1.0)
        return forward(self, *args, **kwargs)
    return wrapper


class CheckpointingLayer(nn.Module):
    """Reads `self.training` outside its forward only (transformers' GradientCheckpointingLayer)."""

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            raise RuntimeError("not in this test")
        return super().__call__(*args, **kwargs)


class Layer(CheckpointingLayer):
    def __init__(self, d=4):
        super().__init__()
        self.a, self.b = Branch(d), Branch(d)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class HelperReadsFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def _maybe_noise(self, x):
        return x + torch.randn_like(x) if self.training else x

    def forward(self, x):
        return self._maybe_noise(self.fc(x))


class Decorated(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(n))

    @keeps_defaults
    def forward(self, x, mask=None, scale=None):
        for layer in self.layers:
            x = layer(x)
        return {"last": x * scale, "mask_given": mask is not None}


def test_leaf_rule_reads_the_forward_and_the_methods_it_calls():
    assert not reads_training_flag(Layer)  # only its __call__ reads the flag
    assert reads_training_flag(HelperReadsFlag)  # its forward's helper does
    tracer = RewireTracer()
    assert not tracer.is_leaf_module(Layer(), "layers.0")
    assert tracer.is_leaf_module(HelperReadsFlag(), "h")
    assert not RewireTracer(not_leaf=[HelperReadsFlag]).is_leaf_module(HelperReadsFlag(), "h")


def test_not_leaf_option_traces_into_a_leaf():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Layer()

        def forward(self, x):
            return self.inner(x)

    with pytest.warns(UserWarning, match="no residual add found"):
        rev = revwire.rewire(Net(), torch.randn(2, 4), leaf_modules=[Layer], strict=False, min_blocks=2)
    assert not hasattr(rev, "revwire_report")  # Layer kept whole: no residual add is visible
    rev = revwire.rewire(Net(), torch.randn(2, 4), leaf_modules=[Layer], not_leaf=[Layer])
    assert revwire.report(rev).num_blocks == 2
    assert revwire.RewireOptions(not_leaf=[Layer]).to_dict()["not_leaf"][0].endswith(":Layer")


def test_decorated_forward_keeps_its_signature_and_output_structure():
    torch.manual_seed(0)
    model = Decorated().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    rev = revwire.rewire(model, x)
    assert rev.meta["revwire_capture"] == "symbolic"
    assert [c.num_blocks for c in revwire.report(rev).chains] == [4]
    out = rev(x)
    assert set(out) == {"last", "mask_given"} and out["mask_given"] is False
    # (the rewired model is a reversible twin, not the same function: compare the capture)
    gm = trace(model, bind_inputs(model, (x,)))
    torch.testing.assert_close(gm(x)["last"], model(x)["last"], rtol=0, atol=0)


class ShapeDependent(nn.Module):
    """Python decisions on shapes and dtypes, which symbolic fx cannot take."""

    def __init__(self, d=4, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Branch(d) for _ in range(n))

    def forward(self, x):
        if x.dtype != torch.float64:
            x = x.double()
        B, N, C = x.shape
        if N % 2:  # pad to an even length
            x = F.pad(x, (0, 0, 0, 1))
        for blk in self.blocks:
            x = x + blk(x)
        return x[:, :N].reshape(B, N * C)


def test_concrete_capture_resolves_shape_control_flow_and_guards_what_it_read():
    torch.manual_seed(0)
    model = ShapeDependent().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(revwire.TraceError):
        revwire.rewire(model, x, capture="symbolic")
    rev = check_rewire(model, (x,), blocks=[3])  # engines agree, parameters shared, keys kept
    assert rev.meta["revwire_capture"] == "concrete"
    assert any("N % 2" in d for d in rev.meta["revwire_decisions"])
    rev(torch.randn(7, 5, 4, dtype=torch.float64))  # the batch size was not read: free
    with pytest.raises(ValueError, match=r"captured for inputs of shape \['\*', 5, '\*'\]"):
        rev(torch.randn(2, 6, 4, dtype=torch.float64))  # N was: guarded


class MovedFirst(nn.Module):
    """The input moved (transpose, permute, a cast) before Python decides on its shape."""

    def __init__(self, how):
        super().__init__()
        self.inner, self.how = ShapeDependent(), how

    def forward(self, x):
        moved = x.transpose(0, 1) if self.how == "transpose" else x.permute(1, 0, 2).float()
        return self.inner(moved)


@pytest.mark.parametrize("how", ["transpose", "permute"])
def test_decisions_on_a_moved_input_guard_the_dimension_it_came_from(how):
    # N is read after the move, as dimension 1 of the moved tensor: dimension 0 of the input.
    # Before, a moved input's dimensions were unknown and every one was guarded.
    torch.manual_seed(0)
    model = MovedFirst(how).double()
    rev = revwire.rewire(model, torch.randn(5, 2, 4, dtype=torch.float64))
    assert rev.meta["revwire_capture"] == "concrete"
    assert rev(torch.randn(5, 7, 4, dtype=torch.float64)).shape == (7, 20)  # batch: free
    with pytest.raises(ValueError, match=r"captured for inputs of shape \[5, '\*', '\*'\]"):
        rev(torch.randn(6, 2, 4, dtype=torch.float64))


def test_data_dependent_control_flow_is_refused_with_both_causes():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate = nn.Linear(4, 4), Gate()

        def forward(self, x):
            return self.gate(self.fc(x))

    with pytest.raises(revwire.TraceError) as e:
        revwire.rewire(Net(), torch.randn(2, 4))
    msg = str(e.value)
    assert "symbolic capture failed at module 'gate'" in msg
    assert "concrete capture failed at module 'gate'" in msg and "tensor values" in msg
    assert "test_capture.py" in msg and "x.sum() > 0" in msg  # the line
    assert "leaf_modules=[Gate]" in msg and "TheModuleClass" not in msg


def test_root_forward_failure_names_no_placeholder_class():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.fc(x).mean() > 0:
                return x
            return -x

    with pytest.raises(revwire.TraceError) as e:
        revwire.rewire(Net(), torch.randn(2, 4))
    msg = str(e.value)
    assert "'<model forward>'" in msg and "TheModuleClass" not in msg and "leaf_modules=[ThatModule]" in msg


class TwoPathway(nn.Module):
    """Takes one list [slow, fast], as pytorchvideo's SlowFast does, and assigns into it."""

    def __init__(self):
        super().__init__()
        self.slow = nn.ModuleList(Branch() for _ in range(2))
        self.fast = nn.ModuleList(Branch() for _ in range(2))

    def forward(self, x):
        assert len(x) == 2
        for s, f in zip(self.slow, self.fast):
            x[0] = x[0] + s(x[0])
            x[1] = x[1] + f(x[1])
        return torch.cat([x[0], x[1]], 0)


def test_list_input_and_its_errors():
    model = TwoPathway().double()
    slow, fast = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(revwire.InputError, match=r"write example_inputs=\(\[a, b, \.\.\.\],\)"):
        revwire.rewire(model, [slow, fast])  # two arguments for a one-argument forward
    rev = revwire.rewire(model, ([slow, fast],))
    assert [c.num_blocks for c in revwire.report(rev).chains] == [2, 2]
    assert rev.revwire_input_shapes == [[[2, 4], [3, 4]]]
    torch.testing.assert_close(rev([slow, fast]).shape, torch.Size([5, 4]))


def test_keyword_inputs_and_constants():
    model = Decorated().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    rev = revwire.rewire(model, {"x": x, "scale": 2.0})
    assert revwire.report(rev).num_blocks == 4
    out = rev(x=x)
    assert out["mask_given"] is False
    inputs = bind_inputs(model, (x,), {"scale": 2.0})
    assert inputs.names == ["x"] and inputs.constants == {"scale": 2.0}
    with pytest.raises(revwire.InputError, match="do not fit"):
        bind_inputs(model, (x,), {"nope": 1})


def test_trace_keeps_the_historical_form():
    model = ShapeDependent().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    gm = trace(model, bind_inputs(model, (x,)), capture="concrete")
    assert any(n.op == "call_module" and n.target == "blocks.0.fc" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with pytest.raises(revwire.TraceError, match="failed on the example inputs' values"):
        trace(model, bind_inputs(model, (torch.randn(2, 5, 3, dtype=torch.float64),)), capture="concrete")
    with pytest.raises(ValueError, match="capture"):
        trace(ShapeDependent(), 1, capture="nope")


def test_leaf_rule_follows_super_calls():
    class Base(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, self.training)

    class Child(Base):
        def forward(self, x):
            return super().forward(x) * 2

    class Plain(nn.Module):
        def forward(self, x):
            return x * 2

    class PlainChild(Plain):
        def forward(self, x):
            return super().forward(x) + 1

    assert reads_training_flag(Child) and not reads_training_flag(PlainChild)
