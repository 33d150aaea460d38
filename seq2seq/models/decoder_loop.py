"""Training's decoder loop as one autograd node, for the peers' decoder on float32 CPU tensors.

The decoder of ``multi30k_gru_concat`` (a one-layer GRU fed [y; previous attentional vector], the additive
attention after it, tanh(W [h; c]) fed to the next step) steps through a batch's target positions one at a
time. Step by step, autograd records a dozen nodes per step and runs them back one by one, each with its
dispatch, its allocations and its weight gradient's small product and addition. Here the forward pass runs
the same products and kernels (``gru_kernel``, ``additive_kernel``) without recording, into buffers for the
whole sequence, and the backward pass runs the steps in reverse itself: per step the products that carry the
gradient back to the previous step and the two kernels' backward passes; every weight's gradient is then one
product over all steps, and the attention's keys', v's and memory's gradients one kernel call. The results
equal the step-by-step path's within float rounding (tests); ``Decoder.pre_outputs`` takes it where
``usable`` says so and the step-by-step path elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from seq2seq.models import additive_kernel, gru_kernel


def usable(decoder, *tensors: torch.Tensor) -> bool:
    """Whether ``decoder`` (a ``Decoder``) can train through :class:`DecoderLoop` on these tensors: the peers'
    decoder (GRU, one layer, ``luong_concat`` attention, input feeding) in float32 on the CPU with both kernels
    built, outside autocast and torch.compile."""
    cfg = decoder.cfg
    if not (cfg.cell == "gru" and cfg.dec_layers == 1 and cfg.attention == "luong_concat" and decoder.input_feeding
            and type(decoder.rnn) is nn.GRU and type(decoder.attention.energy) is nn.Linear
            and not decoder.bf16_products and not decoder.compile_step):
        return False
    parameters = [decoder.rnn.weight_ih_l0, decoder.pre_output.weight, decoder.attention.energy.weight]
    return (additive_kernel.usable(*tensors, *parameters) and gru_kernel.usable(*tensors, *parameters)
            and not torch.is_autocast_enabled("cpu"))


def pre_outputs(decoder, emb_gates: torch.Tensor, hidden: torch.Tensor, feed: torch.Tensor, enc) -> tuple:
    """The loop of ``Decoder.pre_outputs`` for the peers' decoder: emb_gates [B, T, 3D] (the embedding's share
    of the GRU's input product, with its bias), hidden and feed [B, D] (the start state) -> (pre-output
    vectors [B, T, D], attention weights [B, T, S])."""
    rnn, attention, pre_output = decoder.rnn, decoder.attention, decoder.pre_output
    emb_size = decoder.cfg.emb_size
    return DecoderLoop.apply(emb_gates, hidden, feed, enc.keys, enc.memory, enc.mask.contiguous().view(torch.uint8),
                             rnn.weight_ih_l0[:, emb_size:], rnn.weight_hh_l0, rnn.bias_hh_l0,
                             attention.query_proj.weight, attention.energy.weight[0], pre_output.weight,
                             pre_output.bias)


class DecoderLoop(torch.autograd.Function):
    """emb_gates [B, T, 3D], hidden [B, D], feed [B, D], keys [B, S, A], memory [B, S, H], mask [B, S] (uint8),
    w_feed [3D, D] (the GRU's input weight for the fed vector), w_hh [3D, D], b_hh [3D], w_query [A, D], v [A],
    w_pre [D, D + H], b_pre [D] -> (pre-outputs [B, T, D], attention weights [B, T, S]).

    Per step t, with h_0 = hidden and f_0 = feed:
    h_t+1 = GRU(emb_gates[:, t] + f_t w_feed^T, h_t w_hh^T + b_hh, h_t), q = h_t+1 w_query^T,
    (c, weights) = additive attention(q, keys, v, memory, mask), f_t+1 = tanh([h_t+1; c] w_pre^T + b_pre)."""

    @staticmethod
    def forward(ctx, emb_gates, hidden, feed, keys, memory, mask, w_feed, w_hh, b_hh, w_query, v, w_pre, b_pre):
        (batch, steps), size, length, width = emb_gates.shape[:2], w_hh.size(1), keys.size(1), memory.size(2)
        keys, memory, v = keys.contiguous(), memory.contiguous(), v.contiguous()
        if emb_gates.stride(-1) != 1:
            emb_gates = emb_gates.contiguous()
        # every step's results, [T(+1), B, ...]: the backward pass reads them, and the weights' gradients are
        # products over all steps of these rows
        states = emb_gates.new_empty(steps + 1, batch, size)  # h_0 .. h_T
        feeds = emb_gates.new_empty(steps + 1, batch, size)  # f_0 .. f_T (f_t+1: step t's pre-output)
        contexts = emb_gates.new_empty(steps, batch, width)
        queries = emb_gates.new_empty(steps, batch, keys.size(2))
        weights = emb_gates.new_empty(steps, batch, length)
        saved = emb_gates.new_empty(steps, batch, 4 * size)  # the GRU kernel's, per step
        states[0].copy_(hidden)
        feeds[0].copy_(feed)
        w_pre_h, w_pre_c = w_pre[:, :size].t(), w_pre[:, size:].t()  # [D, D], [H, D]
        for t in range(steps):
            gates_in = torch.addmm(emb_gates[:, t], feeds[t], w_feed.t())  # [B, 3D]
            gates_h = torch.addmm(b_hh, states[t], w_hh.t())  # [B, 3D]
            gru_kernel.step_into(gates_in, gates_h, states[t], states[t + 1], saved[t])
            torch.mm(states[t + 1], w_query.t(), out=queries[t])
            additive_kernel.forward_into(queries[t][:, None], keys, v, memory, mask, weights[t][:, None],
                                         contexts[t][:, None])
            torch.addmm(b_pre, states[t + 1], w_pre_h, out=feeds[t + 1]).addmm_(contexts[t], w_pre_c).tanh_()
        ctx.save_for_backward(keys, memory, mask, w_feed, w_hh, w_query, v, w_pre, states, feeds, contexts,
                              queries, weights, saved)
        ctx.set_materialize_grads(False)
        return feeds[1:].transpose(0, 1), weights.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pre, grad_weights):
        (keys, memory, mask, w_feed, w_hh, w_query, v, w_pre, states, feeds, contexts, queries, weights,
         saved) = ctx.saved_tensors
        steps, batch, size = saved.size(0), saved.size(1), w_hh.size(1)
        new = states.new_empty
        grad_pre = new(batch, steps, size).zero_() if grad_pre is None else grad_pre
        # per step, [T, B, ...]: the pre-output's argument, the query, the GRU's two products, the context and
        # the scores
        grad_act, grad_query = new(steps, batch, size), new(steps, batch, queries.size(2))
        grad_gates_in, grad_gates_h = new(steps, batch, 3 * size), new(steps, batch, 3 * size)
        grad_contexts, grad_scores = new(steps, batch, contexts.size(2)), new(steps, batch, weights.size(2))
        direct = new(batch, size)  # the state's gradient through the GRU's update gate
        w_pre_h, w_pre_c = w_pre[:, :size], w_pre[:, size:]
        carry_state = carry_feed = None  # what step t + 1 sends back to h_t+1 and f_t+1
        for t in reversed(range(steps)):
            grad_feed = grad_pre[:, t] if carry_feed is None else grad_pre[:, t] + carry_feed
            torch.ops.aten.tanh_backward.grad_input(grad_feed, feeds[t + 1], grad_input=grad_act[t])
            grad_state = torch.mm(grad_act[t], w_pre_h)  # [B, D]
            torch.mm(grad_act[t], w_pre_c, out=grad_contexts[t])
            step_weights = None if grad_weights is None else grad_weights[:, t][:, None].contiguous()
            additive_kernel.backward_into(queries[t][:, None], keys, v, mask, memory, weights[t][:, None],
                                          grad_contexts[t][:, None], step_weights, grad_scores[t][:, None], False,
                                          grad_query[t][:, None], None, None, None)
            grad_state.addmm_(grad_query[t], w_query)
            gru_kernel.step_backward_into(grad_state, carry_state, states[t], saved[t], grad_gates_in[t],
                                          grad_gates_h[t], direct)
            carry_state = torch.addmm(direct, grad_gates_h[t], w_hh)  # [B, D] to h_t
            carry_feed = torch.mm(grad_gates_in[t], w_feed)  # [B, D] to f_t

        def over_steps(grads, inputs):  # sum_t grads[t]^T inputs[t]: [out, in], one product
            return torch.mm(grads.reshape(-1, grads.size(-1)).t(), inputs.reshape(-1, inputs.size(-1)))

        grad_w_pre = torch.cat([over_steps(grad_act, states[1:]), over_steps(grad_act, contexts)], dim=1)
        # the attention's keys, v and memory: one call over all steps, [B, T, ...] as the kernel reads them
        query_all, weights_all, grad_contexts_all, grad_scores_all = (
            x.transpose(0, 1).contiguous() for x in (queries, weights, grad_contexts, grad_scores))
        grad_keys, grad_memory = torch.empty_like(keys), torch.empty_like(memory)
        grad_v_parts = additive_kernel.v_parts(query_all, v)
        additive_kernel.backward_into(query_all, keys, v, mask, memory, weights_all, grad_contexts_all, None,
                                      grad_scores_all, True, None, grad_keys, grad_v_parts, grad_memory)
        return (grad_gates_in.transpose(0, 1), carry_state, carry_feed, grad_keys, grad_memory, None,
                over_steps(grad_gates_in, feeds[:-1]), over_steps(grad_gates_h, states[:-1]),
                grad_gates_h.sum((0, 1)), over_steps(grad_query, states[1:]), grad_v_parts.sum(0), grad_w_pre,
                grad_act.sum((0, 1)))
