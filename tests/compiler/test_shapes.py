"""Step 2 of the compiler: `propagate` describes every node (docs/design.md §4).

Fake tensors first; a module that needs real values (data-dependent code) makes it fall
back to one real eager forward. Either way the model's state is left as it was.
"""
import pytest
import torch
from torch import nn

from revwire.compiler import shapes
from revwire.compiler.shapes import info, propagate
from revwire.compiler.trace import trace
from revwire.errors import InputError


class Gate(nn.Module):
    """Data-dependent: fake tensors cannot decide the branch."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class Net(nn.Module):
    def __init__(self, gate=False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.gate = Gate() if gate else nn.Identity()
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        n = x.shape[0]
        h = self.drop(self.bn(self.fc(self.gate(x)))) * self.scale
        return h.reshape(n, 2, 2)


def _described(gate: bool):
    model = Net(gate).train()
    gm = trace(model, 1, leaf_modules=(Gate,))
    return model, gm


@pytest.mark.parametrize("gate", [False, True], ids=["fake", "eager-fallback"])
def test_every_node_is_described(gate, monkeypatch):
    model, gm = _described(gate)
    fake_ran = []
    real = shapes._propagate_fake
    monkeypatch.setattr(shapes, "_propagate_fake", lambda *a: fake_ran.append(real(*a)) or fake_ran[-1])
    propagate(gm, (torch.randn(3, 4),))
    assert fake_ran == [not gate]  # the gate's `if x.sum() > 0` needs real values
    by_name = {n.name: n for n in gm.graph.nodes}
    assert info(by_name["x"]).shape == (3, 4) and info(by_name["x"]).dtype == torch.float32
    (reshape,) = [n for n in gm.graph.nodes if n.target == "reshape"]
    assert info(reshape).shape == (3, 2, 2)
    shape_read, getitem = by_name["getattr_1"], by_name["getitem"]  # x.shape, x.shape[0]
    assert info(shape_read).is_metadata and info(shape_read).value == (3, 4)
    assert info(getitem).has_value and info(getitem).value == 3 and info(getitem).is_metadata
    (scale,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert info(scale).is_constant and not info(scale).is_metadata
    assert not info(reshape).is_metadata and not info(reshape).is_constant


@pytest.mark.parametrize("gate", [False, True], ids=["fake", "eager-fallback"])
def test_model_state_is_untouched(gate):
    model, gm = _described(gate)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    propagate(gm, (x,))
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # no BN update
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing from the global RNG
    assert model.training and model.bn.training and model.drop.training


def test_an_input_the_model_refuses_is_an_input_error():
    _, gm = _described(False)
    with pytest.raises(InputError, match=r"example_inputs of shapes \[\(3, 5\)\] failed"):
        propagate(gm, (torch.randn(3, 5),))


def test_nodes_propagate_did_not_see_are_unknown():
    _, gm = _described(False)
    assert all(info(n) == shapes.NodeInfo() for n in gm.graph.nodes)
