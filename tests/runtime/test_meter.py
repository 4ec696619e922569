"""Memory meters (docs/design.md §7)."""
import pytest
import torch
from torch import nn

import revwire

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
