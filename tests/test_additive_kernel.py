"""The additive attention's C kernel: context, weights and their gradients against float64 ATen, the attention
module with and without it, threads and forked processes, the compiled library's cache, and the fall-back without
a compiler."""
import logging
import os
import shutil

import pytest
import torch

from seq2seq.models import additive_kernel, clib
from seq2seq.models.attention import AdditiveAttention

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")


def reference(query, keys, v, memory, mask):
    """(context [B, T, H], weights [B, T, S]) in ATen ops."""
    scores = torch.tanh(query[:, :, None, :] + keys[:, None, :, :]) @ v  # [B, T, S]
    weights = torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
    return weights @ memory, weights


def inputs(batch, steps, length, size, seed=0, width=None):
    """query [B, T, A], keys [B, S, A], v [A], memory [B, S, H], mask [B, S] (position 0 always real)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, steps, size, generator=generator)
    keys = torch.randn(batch, length, size, generator=generator)
    v = torch.randn(size, generator=generator)
    memory = torch.randn(batch, length, width or size + 3, generator=generator)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    mask[:, 0] = True
    return query, keys, v, memory, mask


@needs_compiler
@pytest.mark.parametrize("shape", [(3, 1, 5, 16), (4, 3, 7, 37), (2, 1, 1, 8)])  # 37: not a multiple of the SIMD width
@pytest.mark.parametrize("weights_used", [False, True])  # the weights' gradient: none, or one
def test_context_weights_and_gradients_match_float64(shape, weights_used):
    query, keys, v, memory, mask = inputs(*shape)
    grad_context = torch.randn(shape[0], shape[1], memory.size(2))
    grad_weights = torch.randn(shape[0], shape[1], shape[2])
    exact = [x.double().requires_grad_() for x in (query, keys, v, memory)]
    expected = reference(*exact, mask)
    ours = [x.clone().requires_grad_() for x in (query, keys, v, memory)]
    context, weights = additive_kernel.additive_attention(*ours, mask)
    if weights_used:
        torch.autograd.backward(expected, [grad_context.double(), grad_weights.double()])
        torch.autograd.backward((context, weights), [grad_context, grad_weights])
    else:
        expected[0].backward(grad_context.double())
        context.backward(grad_context)
    assert (context.double() - expected[0]).abs().max() < 1e-5
    assert (weights.double() - expected[1]).abs().max() < 1e-6
    assert (weights[~mask[:, None, :].expand_as(weights)] == 0).all()  # masked positions: exactly 0
    for mine, theirs in zip(ours, exact):
        assert (mine.grad.double() - theirs.grad).abs().max() < 1e-5 * max(1.0, theirs.grad.abs().max().item())
    with torch.no_grad():  # the no-grad path gives the same results
        found = additive_kernel.additive_attention(query, keys, v, memory, mask)
    assert torch.equal(found[0], context.detach()) and torch.equal(found[1], weights.detach())


@needs_compiler
@pytest.mark.parametrize("weights_used", [False, True])
def test_step_gradients_match_float64_over_a_loop_of_steps(weights_used):
    """A loop of one-step calls through StepGradients (training's decoder) gives the queries', keys', v's and
    memory's gradients of the whole loop, also where the sink's keys and memory are used outside the steps."""
    steps, (batch, length, size) = 4, (5, 7, 37)
    _, keys, v, memory, mask = inputs(batch, 1, length, size, seed=2)
    generator = torch.Generator().manual_seed(3)
    queries = [torch.randn(batch, 1, size, generator=generator) for _ in range(steps)]
    grad_contexts = [torch.randn(batch, 1, memory.size(2), generator=generator) for _ in range(steps)]
    grad_weights = [torch.randn(batch, 1, length, generator=generator) for _ in range(steps)]
    found = {}
    for kind in ("float64", "steps"):
        leaves = [x.clone().double() if kind == "float64" else x.clone() for x in [keys, v, memory] + queries]
        leaves = [x.requires_grad_() for x in leaves]
        (k, vv, m), qs = leaves[:3], leaves[3:]
        sink = additive_kernel.StepGradients(k, vv, m, mask) if kind == "steps" else None
        outputs, grads = [], []
        for t, q in enumerate(qs):
            context, weights = reference(q, k, vv, m, mask) if sink is None else sink.attend(q)
            outputs += [context] + ([weights] if weights_used else [])
            grads += [grad_contexts[t]] + ([grad_weights[t]] if weights_used else [])
        if sink is not None:  # the sink's own keys and memory used outside the steps too
            k, m = sink.keys, sink.memory
        outputs += [(k * k).sum(), m.sum()]
        torch.autograd.backward(outputs, [g.to(outputs[0].dtype) for g in grads] + [torch.tensor(1.0)] * 2)
        found[kind] = [x.grad.double() for x in leaves]
    for mine, exact in zip(found["steps"], found["float64"]):
        assert (mine - exact).abs().max() < 1e-5 * max(1.0, exact.abs().max().item())


@needs_compiler
def test_step_gradients_leave_no_reference_cycle():
    """The batch's StepGradients (and with it every step's saved tensors) is freed with its graph, without
    the garbage collector."""
    import gc
    import weakref

    _, keys, v, memory, mask = inputs(3, 1, 5, 16)
    keys, v, memory = (x.requires_grad_() for x in (keys, v, memory))
    gc.disable()
    try:
        sink = additive_kernel.StepGradients(keys, v, memory, mask)
        alive = weakref.ref(sink)
        loss = sum(sink.attend(torch.randn(3, 1, 16))[0].sum() for _ in range(3))
        del sink
        loss.backward()
        assert keys.grad is not None and v.grad is not None and memory.grad is not None
        del loss
        assert alive() is None
    finally:
        gc.enable()


@needs_compiler
def test_results_and_gradients_do_not_depend_on_the_thread_count():
    query, keys, v, memory, mask = inputs(37, 2, 9, 64, seed=1)  # 42,624 elements: shared out over the threads
    assert query.numel() * keys.size(1) >= additive_kernel.PARALLEL_ELEMENTS
    grad = torch.randn(37, 2, memory.size(2))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            ours = [x.clone().requires_grad_() for x in (query, keys, v, memory)]
            context, weights = additive_kernel.additive_attention(*ours, mask)
            context.backward(grad)
            results.append([context.detach(), weights.detach()] + [x.grad for x in ours])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))  # v's gradient too: summed in fixed parts
    assert torch.allclose(results[0][0], reference(query, keys, v, memory, mask)[0], atol=1e-5)


@needs_compiler
def test_attention_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(0)
    attention = AdditiveAttention(12, 10, 16)
    memory = torch.randn(3, 5, 10)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    query = torch.randn(3, 2, 12)
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv("SEQ2SEQ_ADDITIVE_KERNEL", switch)
        monkeypatch.setattr(additive_kernel.LIBRARY, "_loaded", {})
        assert (additive_kernel.kernel() is not None) == (switch == "1")
        attention.zero_grad()
        leaf_query, leaf_memory = query.clone().requires_grad_(), memory.clone().requires_grad_()
        context, weights = attention(leaf_query, attention.project_keys(leaf_memory), leaf_memory, mask)
        (context.square().sum() + weights[:, :, 0].sum()).backward()
        runs.append([context, weights, leaf_query.grad, leaf_memory.grad]
                    + [p.grad.clone() for p in attention.parameters()])
    for fused, plain in zip(*runs):
        assert torch.allclose(fused, plain, atol=1e-6)
    assert (runs[0][1][~mask[:, None, :].expand(-1, 2, -1)] == 0).all()


def test_wrong_shapes_are_refused_before_the_kernel_reads_memory():
    query, keys, v, memory, mask = inputs(2, 1, 4, 8)
    with pytest.raises(ValueError, match="do not fit"):
        additive_kernel._forward(query, keys[:, :, :6].contiguous(), v, memory, mask.view(torch.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        additive_kernel._forward(query, keys, v, memory[:, :3].contiguous(), mask.view(torch.uint8))


@needs_compiler
def test_the_library_is_built_once_per_source_and_cpu(tmp_path):
    built = additive_kernel.LIBRARY.build(tmp_path)
    stamp = built.stat().st_mtime_ns
    assert additive_kernel.LIBRARY.build(tmp_path) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no half-written leftovers


def test_without_a_compiler_the_aten_path_is_taken(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(additive_kernel.LIBRARY, "_loaded", {})
    with caplog.at_level(logging.WARNING):
        assert additive_kernel.kernel() is None
        assert not additive_kernel.usable(torch.zeros(1))
    assert "no C compiler 'no-such-compiler-here'" in caplog.text
    attention = AdditiveAttention(4, 4, 4)
    memory = torch.randn(2, 3, 4)
    context, weights = attention(torch.randn(2, 1, 4), attention.project_keys(memory), memory,
                                 torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 1))


def test_a_failing_compiler_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="additive_attention.c"):
        additive_kernel.LIBRARY.build(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_compiler
def test_threads_calling_at_once_get_their_own_results(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(additive_kernel.LIBRARY, "_loaded", {})  # built while the callers race for it
    problems = [inputs(5 + i, 2, 7, 24, seed=i) for i in range(3)]  # each on its calling thread
    problems += [inputs(40 + i, 2, 9, 64, seed=i) for i in range(3)]  # each shared out over OpenMP threads
    assert problems[-1][0].numel() * problems[-1][1].size(1) >= additive_kernel.PARALLEL_ELEMENTS
    expected = [reference(*problem)[0] for problem in problems]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(3) as pool:
            found = list(pool.map(lambda p: additive_kernel.additive_attention(*p)[0], problems))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.allclose(f, e, atol=1e-5) for f, e in zip(found, expected))


def test_a_compiler_that_hangs_is_given_up(monkeypatch, tmp_path):
    hanging = tmp_path / "hanging-cc"
    hanging.write_text("#!/bin/sh\nsleep 30\n")
    hanging.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setattr(clib, "COMPILE_TIMEOUT_S", 1)
    with pytest.raises(RuntimeError, match="took over 1 s"):
        additive_kernel.LIBRARY.build(tmp_path / "cache")


def _scores_in_child(problem, queue):
    torch.set_num_threads(2)
    queue.put(additive_kernel.additive_attention(*problem)[0].tolist())


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_computes_the_attention():
    import multiprocessing

    problem = inputs(30, 1, 9, 128, seed=3)  # large enough to be shared out over threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = additive_kernel.additive_attention(*problem)[0]  # built, loaded, threads started in the parent
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_scores_in_child, args=(problem, queue))
    child.start()
    try:
        found = queue.get(timeout=30)  # a child waiting on anything of its parent's would time out
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert found == expected.tolist()
