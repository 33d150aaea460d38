"""The fast CPU dropout: the mask's rate, the scaling, the gradient, and where it steps aside; with the C kernel
and with ATen's bits."""
import os
import shutil

import pytest
import torch

from seq2seq.models import dropout as dropout_module
from seq2seq.models.dropout import LEVELS, Dropout, dropout


@pytest.fixture(autouse=True, params=["kernel", "aten"])
def way(request, monkeypatch):
    """Every test runs with the C kernel (where a compiler is) and with ATen's random bits."""
    if request.param == "kernel" and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SEQ2SEQ_DROPOUT_KERNEL", "1" if request.param == "kernel" else "0")
    dropout_module.LIBRARY.forget()
    yield request.param
    dropout_module.LIBRARY.forget()


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(400_003)  # not a multiple of 4: the last draw is used in part
    y = dropout(x, p, True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=0.004)  # 400k draws: std of the rate < 0.001
    kept = y[y != 0]
    assert torch.all(kept == LEVELS / (LEVELS - round(p * LEVELS)))  # 1 / (1 - p), exactly
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_masks_differ_per_call_and_follow_the_seed():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.3, True), dropout(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, True), a) and not torch.equal(a, b)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25, True)
    y.sum().backward()
    scale = LEVELS / (LEVELS - round(0.25 * LEVELS))
    assert torch.allclose(x.grad, (y != 0).float() * scale)
    assert torch.allclose(y, x.detach() * x.grad)


def test_evaluation_and_edge_rates_are_plain():
    x = torch.randn(5, 7)
    module = Dropout(0.4).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_bfloat16_input_stays_bfloat16():
    y = dropout(torch.ones(100, dtype=torch.bfloat16), 0.2, True)
    assert y.dtype == torch.bfloat16


def test_the_kernel_is_used_where_it_can_be(way):
    assert dropout_module.LIBRARY.usable(torch.ones(3)) == (way == "kernel")


def test_neighbouring_elements_and_calls_are_independent():
    """Pairs of elements (neighbours, and the same element in two calls) are both kept at rate (1 - p)^2."""
    torch.manual_seed(4)
    x = torch.ones(200_000)
    a, b = dropout(x, 0.5, True) != 0, dropout(x, 0.5, True) != 0
    for first, second in ((a[:-1], a[1:]), (a[:-4], a[4:]), (a, b)):
        assert (first & second).float().mean().item() == pytest.approx(0.25, abs=0.005)


def test_mask_does_not_depend_on_the_thread_count():
    x = torch.randn(300_001, requires_grad=True)  # enough to be shared out over the threads
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            torch.manual_seed(5)
            y = dropout(x, 0.2, True)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), x.grad.clone()))
            x.grad = None
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_runs_under_the_profiler_recording_shapes():
    """The profiler records an autograd Function's arguments, the seed among them, as 64-bit ints."""
    x = torch.ones(1000, requires_grad=True)
    for seed in range(20):  # some seeds drawn are negative
        torch.manual_seed(seed)
        with torch.profiler.profile(record_shapes=True):
            dropout(x, 0.2, True).sum().backward()
