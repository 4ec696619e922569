"""Memory meters (docs/design.md §7): the step-peak meter against hand counts, saved bytes, CUDA peak."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import revwire
from revwire import InputError, StepMeter, step_peak, train_step_peak

F32 = 4

pytestmark = pytest.mark.usefixtures("small_cpu")


def test_saved_tensor_bytes_counts_each_storage_once():
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    out, nbytes = revwire.saved_tensor_bytes(lambda: a * b)  # mul saves both inputs
    assert nbytes == 2 * 100 * 4
    assert out.grad_fn is not None
    _, nbytes = revwire.saved_tensor_bytes(lambda: a.view(10, 10) * a.view(10, 10).t())
    assert nbytes == 100 * 4  # two views of one storage
    _, nbytes = revwire.saved_tensor_bytes(lambda: a * b, exclude=[a])
    assert nbytes == 100 * 4
    with torch.no_grad():
        _, nbytes = revwire.saved_tensor_bytes(lambda: a * b)
    assert nbytes == 0


def test_saved_tensor_bytes_passes_arguments():
    x = torch.randn(8, 4, requires_grad=True)
    out, nbytes = revwire.saved_tensor_bytes(torch.nn.functional.linear, x, weight=torch.randn(3, 4))
    # grad of x needs the weight; x itself is not saved (the weight needs no grad)
    assert out.shape == (8, 3) and nbytes == 3 * 4 * 4


def test_model_saved_bytes_excludes_parameters_and_counts_the_loss():
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
    x = torch.randn(4, 16)
    # linear saves x (the weight is excluded); tanh saves its output
    assert revwire.model_saved_bytes(model, x) == (4 * 16 + 4 * 32) * 4
    with_loss = revwire.model_saved_bytes(model, x, loss_fn=lambda y: (y ** 2).sum())
    assert with_loss == (4 * 16 + 4 * 32) * 4  # pow saves the tanh output: already counted
    with_loss = revwire.model_saved_bytes(model, x, loss_fn=lambda y: (y.exp()).sum())
    assert with_loss == (4 * 16 + 2 * 4 * 32) * 4  # exp saves its (new) output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_peak_bytes_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        revwire.cuda_peak_bytes(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_bytes_sees_an_allocation():
    out, peak = revwire.cuda_peak_bytes(lambda: torch.empty(1 << 20, device="cuda"))
    assert peak >= 4 << 20


# ---------------------------------------------------------------- the step-peak meter


def _rows_sum(report):
    return sum(r.bytes for r in report.breakdown)


def test_step_peak_counts_an_allocation_until_it_is_freed():
    def fn():
        a = torch.empty(1000)
        del a
        return torch.empty(250)

    r = step_peak(fn)
    assert (r.peak, r.baseline, r.end) == (1000 * F32, 0, 250 * F32)
    assert r.result.shape == (250,)
    assert r.peak_op == "empty" and _rows_sum(r) == r.peak
    assert [(row.op, row.count, row.bytes) for row in r.breakdown] == [("empty", 1, 1000 * F32)]


def test_views_and_in_place_ops_are_not_counted_again():
    def fn():
        a = torch.zeros(1000)
        v, w = a.view(10, 100), a[::2]
        v.add_(1)
        w.mul_(2)
        return a.t() if a.dim() == 2 else a.unsqueeze(0).expand(3, 1000)

    r = step_peak(fn)
    assert r.peak == r.end == 1000 * F32


def test_resize_is_counted():
    def fn():
        a = torch.empty(10)
        a.resize_(1000)
        return a

    assert step_peak(fn).peak == 1000 * F32


def test_arguments_and_unseen_tensors_are_the_baseline():
    a = torch.randn(1000)
    hidden = torch.randn(1000)  # neither an argument nor a root: found as an op's input

    def fn(x):
        y = x * 2 + hidden  # x * 2, then a new sum: two 1000-element temporaries at the add
        return y.sum()

    r = step_peak(fn, a)
    assert r.baseline_by_kind["inputs"] == 1000 * F32
    assert r.baseline_by_kind["unseen"] == 1000 * F32
    assert r.baseline == 2000 * F32
    # the unseen tensor was alive at the peak too, though found after it began
    assert r.peak == r.baseline + 2 * 1000 * F32
    assert r.end == r.baseline + F32 and _rows_sum(r) == r.peak


def test_a_saved_tensor_is_freed_by_the_backward():
    w = torch.randn(256, requires_grad=True)

    def fn():
        y = w.exp()  # saves its output (256 floats), freed by autograd after its backward
        y.sum().backward()
        return y.grad_fn

    r = step_peak(fn, roots=[w])
    assert r.baseline == 256 * F32
    # in exp's backward: the gradient it makes (256), its saved output (256), the loss and
    # the backward's seed (0-dim each); at the end only w.grad is left, though the node
    # that saved y is still referenced (autograd released its saved tensor)
    assert r.peak == r.baseline + 2 * 256 * F32 + 2 * F32
    assert r.result is not None and r.end == r.baseline + 256 * F32


def _mlp(B=64, D=32, H=128, C=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C)), torch.randn(B, D), torch.randint(0, C, (B,))


def test_mlp_training_step_to_the_byte():
    """Linear(D, H) -> ReLU -> Linear(H, C), cross-entropy, AdamW (CPU: one tensor at a
    time), gradients allocated before the step (see NOTE [ The metered training step ])."""
    B, D, H, C = 64, 32, 128, 10
    model, x, t = _mlp(B, D, H, C)
    r = train_step_peak(model, x, t)
    P = (D * H + H + H * C + C) * F32
    assert r.baseline_by_kind == {"parameters": P, "gradients": P,
                                  "optimizer_state": 2 * P + 4 * F32,  # exp_avg, exp_avg_sq, 4 fp32 steps
                                  "buffers": 0, "inputs": B * D * F32 + B * 8, "unseen": 0}
    base = r.baseline
    assert base == 4 * P + 4 * F32 + B * D * F32 + B * 8
    # forward: at the ReLU, h = x W1^T + b1 and relu(h) are alive
    assert r.phase_peaks["forward"] == base + 2 * B * H * F32
    # backward: at ReLU's backward, its output, the incoming gradient (B, H) and the saved
    # relu(h); plus the loss and the backward's seed (0-dim each)
    assert r.phase_peaks["backward"] == base + 3 * B * H * F32 + 2 * F32
    # AdamW at W1: sqrt(exp_avg_sq) and its division by the bias correction (2 x W1), the loss
    assert r.phase_peaks["optimizer"] == base + 2 * H * D * F32 + F32
    assert r.peak == r.phase_peaks["backward"] and r.peak_phase == "backward"
    assert r.peak_op == "threshold_backward" and r.above_baseline == 3 * B * H * F32 + 2 * F32
    assert _rows_sum(r) == r.peak
    at_peak = {(row.phase, row.op, row.module): row.bytes for row in r.breakdown}
    assert at_peak[("forward", "relu", "1")] == B * H * F32  # saved by ReLU for its backward
    assert at_peak[("backward", "mm", "2")] == B * H * F32  # gradient of relu(h), from Linear 2's node
    assert at_peak[("backward", "threshold_backward", "1")] == B * H * F32
    # gradients zeroed in place: only the returned loss is left over
    assert r.end == base + F32 and r.untracked == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_checkpoint_recompute_is_attributed_to_its_module():
    B, D, H, C = 64, 32, 128, 10
    model, x, t = _mlp(B, D, H, C)

    class Ck(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    ck = nn.Sequential(Ck(model[:2]), model[2])
    plain = train_step_peak(model, x, t)
    r = train_step_peak(ck, x, t)
    assert r.baseline == plain.baseline
    # the forward keeps only x: h is freed at once and relu(h) is not saved
    assert r.phase_peaks["forward"] == plain.phase_peaks["forward"]
    recomputed = [row for row in r.breakdown if row.phase == "backward" and row.module.startswith("0.inner")]
    assert recomputed, r.format(20)
    assert _rows_sum(r) == r.peak


def test_meter_bad_input_and_cleanup():
    from torch.nn.modules import module as m

    hooks = (len(m._global_forward_pre_hooks), len(m._global_forward_hooks))
    with pytest.raises(InputError, match="callable"):
        step_peak(42)
    with pytest.raises(InputError, match="roots"):
        StepMeter(roots=["model"]).__enter__()
    with pytest.raises(InputError, match="rounding"):
        StepMeter(rounding=0)
    with pytest.raises(InputError, match="meta"):
        StepMeter(device="meta")
    with pytest.raises(InputError, match="warmup"):
        train_step_peak(nn.Linear(2, 2), torch.randn(1, 2), warmup=0)
    with pytest.raises(InputError, match="inputs"):
        train_step_peak(nn.Linear(2, 2), "x")
    meter = StepMeter()
    with pytest.raises(InputError, match="after"):
        meter.report()
    with pytest.raises(ZeroDivisionError):
        with meter:
            with meter.phase("forward"):
                torch.ones(3).sum()
                1 / 0
    assert (len(m._global_forward_pre_hooks), len(m._global_forward_hooks)) == hooks
    assert meter.report().peak == 3 * F32 + F32
    with pytest.raises(InputError, match="once"):
        meter.__enter__()
    with pytest.raises(InputError, match="phase"):
        with StepMeter() as again:
            again.phase("baseline").__enter__()


def test_rounding_and_device_filter():
    r = step_peak(lambda: [torch.empty(1), torch.empty(200)], rounding=512)
    assert r.peak == 512 + 1024 and r.rounding == 512  # 4 and 800 bytes, rounded up
    assert step_peak(lambda: torch.empty(100), device="cpu").peak == 400
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            step_peak(lambda: torch.empty(100), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meter_agrees_with_the_allocator():
    model, x, t = _mlp(B=512, D=256, H=1024, C=10)
    model, x, t = model.cuda(), x.cuda(), t.cuda()
    r = train_step_peak(model, x, t)
    cuda = r.cuda
    allocator = cuda["max_allocated"] - cuda["allocated_at_start"]
    # the allocator also holds what the meter does not see (cuBLAS workspaces are
    # allocated before; kernels' own temporaries): agree to within 1 MiB here
    assert abs(allocator - r.above_baseline) <= 2**20, (allocator, r.above_baseline)


def test_breakdown_by_op_sums_over_modules():
    model, x, t = _mlp()
    r = train_step_peak(model, x, t)
    rows = r.by_op()
    assert sum(row.bytes for row in rows) == r.peak
    assert len({(row.phase, row.op) for row in rows}) == len(rows)
    fw = {row.op: row for row in rows if row.phase == "forward"}
    assert fw["relu"].module == "1" and fw["relu"].count == 1
