"""Small residual branches and a two-engine runner shared by the engine tests."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revwire


class MLP(nn.Module):
    """Pre-norm MLP branch: works on any (..., dim) stream."""

    def __init__(self, dim, hidden=None, p=0.0):
        super().__init__()
        hidden = hidden or 2 * dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class Attention(nn.Module):
    """Pre-norm self-attention branch on (B, N, dim), with attention and projection dropout.
    `sdpa=True` uses F.scaled_dot_product_attention (dropout drawn inside the kernel)."""

    def __init__(self, dim, heads=2, p=0.0, sdpa=False):
        super().__init__()
        self.heads, self.p, self.sdpa = heads, p, sdpa
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(p)
        self.proj_drop = nn.Dropout(p)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        else:
            attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
            o = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))


class ConvBN(nn.Module):
    """Conv branch with train-mode BatchNorm (ResNet-style, activation moved into the branch)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def transformer_blocks(layers, dim, heads=2, p=0.0, sdpa=False):
    """`layers` pre-norm transformer layers = 2 * layers residual branches."""
    blocks = []
    for _ in range(layers):
        blocks += [Attention(dim, heads, p, sdpa), MLP(dim, p=p)]
    return blocks


def rel(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_rel(ds_a, ds_b):
    """Largest relative error over the entries of two dicts with the same keys."""
    assert ds_a.keys() == ds_b.keys()
    return max((rel(ds_a[k], ds_b[k]) for k in ds_a), default=0.0)


def loss_of(out):
    """A loss with a fixed random projection (drawn from its own generator, not the global RNG)."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return (out * w).sum()


def run_step(model, engine, x, seed=None, loss=loss_of):
    """One forward + backward with `engine`; returns output, grads and buffers (cloned)."""
    revwire.set_engine(model, engine)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    loss(out).backward()
    return {
        "out": out.detach(),
        "grad_fn": type(out.grad_fn).__name__,
        "x_grad": x.grad,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def both_engines(model, x, seed=0, loss=loss_of):
    """Run one step with each engine from the same state (buffers restored in between)."""
    state = copy.deepcopy(model.state_dict())
    ag = run_step(model, "autograd", x, seed, loss)
    model.load_state_dict(state)
    rev = run_step(model, "reversible", x, seed, loss)
    assert ag["grad_fn"] != "_StageOutputBackward"
    assert rev["grad_fn"] == "_StageOutputBackward"
    return ag, rev


def assert_engines_match(ag, rev, out_tol=1e-9, grad_tol=1e-7, buf_tol=1e-9):
    assert rel(rev["out"], ag["out"]) <= out_tol
    if ag["x_grad"] is None:
        assert rev["x_grad"] is None
    else:
        assert rel(rev["x_grad"], ag["x_grad"]) <= grad_tol
    assert ag["grads"], "no parameter received a gradient"
    assert max_rel(rev["grads"], ag["grads"]) <= grad_tol
    for k, b in ag["buffers"].items():
        if b.is_floating_point():
            assert rel(rev["buffers"][k], b) <= buf_tol, k
        else:
            assert torch.equal(rev["buffers"][k], b), k


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for every test: the tensors are tiny, and on a shared 2-core CPU
    OpenMP workers spin-wait and make steps many times slower (up to 50x seen here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_cpu():
    """Seeded (and, as every test, on one intra-op thread)."""
    torch.manual_seed(0)


class TanhBranch(nn.Module):
    """The smallest residual branch: tanh(Linear(x))."""

    def __init__(self, d=4):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def perturb_weights(model, seed=0, scale=0.05, replace=False):
    """Random weights unlike a fresh init (timm zero-inits the last BN of each ResNet
    block), and BatchNorm statistics away from 0 / 1. `replace` draws weights afresh."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(noise) if replace else p.add_(noise)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


# -- data-parallel tests (DDP, FSDP2): the same batch in every process -----------------------


def distributed_data(batch: int, tokens: int, dim: int):
    """A float64 batch and the weights of a linear loss, the same in every process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64)
    w = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64)
    return x, w


def per_sample_loss(out, w):
    """A mean over samples: DDP and FSDP average gradients over ranks, so the ranks' halves
    give the whole batch's gradient."""
    return (out * w).sum() / out.shape[0]
