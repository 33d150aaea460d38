"""The in-place tanh of the attention, pre-output and GRU cell (2 sigmoid(2x) - 1 on float32 CPU tensors)."""
import torch

from seq2seq.models.tanh import tanh_


def test_values_match_tanh_in_place():
    x = torch.cat([torch.linspace(-30, 30, 10_001), torch.tensor([0.0, -0.0, 1e-30, float("inf"), float("-inf")])])
    expected = torch.tanh(x.double())
    y = x.clone()
    assert tanh_(y) is y
    assert (y.double() - expected).abs().max() < 3e-7
    assert torch.isnan(tanh_(torch.tensor([float("nan")]))).all()


def test_gradient_is_that_of_tanh():
    torch.manual_seed(0)
    a = torch.randn(6, 7, dtype=torch.float32, requires_grad=True)
    b = torch.randn(6, 7, dtype=torch.float32)
    grad_out = torch.randn(6, 7)
    ours = tanh_(a * 3.0 + 1.0)  # a fresh sum, as in the attention, overwritten in place
    (ours * grad_out).sum().backward()
    ours_grad, a.grad = a.grad.clone(), None
    reference = torch.tanh(a * 3.0 + 1.0)
    (reference * grad_out).sum().backward()
    assert torch.allclose(ours, reference, atol=3e-7)
    assert torch.allclose(ours_grad, a.grad, atol=1e-5)
    # an input that does not need gradients stays on the no-grad path
    assert torch.allclose(tanh_(b.clone()), torch.tanh(b), atol=3e-7)


def test_other_types_take_tanh():
    x = torch.randn(100, dtype=torch.float64)
    assert torch.equal(tanh_(x.clone()), torch.tanh(x))
    h = torch.randn(100).to(torch.bfloat16)
    assert torch.equal(tanh_(h.clone()), torch.tanh(h))
