"""The output layer and cross-entropy in one pass over row chunks, never holding all the logits.

Training computes logits [N, V] for every target position, a softmax over them, and the same
again backwards: five or so passes over an N x V float32 tensor (N = 4,000 tokens and V = 8,000 is
128 MB). On a CPU those passes are bound by memory bandwidth, and cost more than the matrix products.
Here each chunk of rows goes through logits, softmax, loss and gradient in buffers reused for every chunk;
the gradients are computed in the forward pass and scaled in the backward pass (the loss is a sum, so
they are linear in its incoming gradient). The result equals ``F.cross_entropy(x @ W.T + b, target,
ignore_index=PAD, reduction="sum", label_smoothing=eps)`` up to float rounding (tests check).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from seq2seq.models import loss_kernel
from seq2seq.tokenizer import PAD_ID

CHUNK_ROWS = 256  # the fewest rows in a chunk, and bfloat16's on the CPU (256 x 8k logits = 8 MB)
# float32 chunks hold fewer logits than this: under 32 MiB (1,048 rows at 8k vocabulary, 1,023 at 8,192), so
# that glibc reuses their buffers rather than mapping them afresh (``runtime.keep_freed_memory``'s largest
# block is 32 MiB). On a GPU the step waits on kernel launches: Multi30k training on an H100 (paired A/B, 150
# batches of 4,000 tokens) ran 1.10x the speed of 256-row chunks at 589 against 478 MiB peak; 2**25 (one chunk
# per batch) 1.12x at 822 MiB. On a CPU the products run faster with more rows (AMD EPYC, 2 threads: the
# forward product 117 GFLOP/s at 256 rows, 162 at 1,024): Multi30k's forward and backward passes 1.05x and
# 1.07x the speed of 256-row chunks (two paired in-process A/Bs of 40 batches), 2,048 rows the same as 1,024,
# 4,096 slower (0.94x)
CHUNK_LOGITS = 2**23
# In low precision the weight gradient takes the logit gradients of this many rows in one product: each
# product's [V, D] result is converted to float32 and added, a pass that cost more than the product
LOW_PRECISION_GROUP_ROWS = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, label_smoothing: float, low_precision: Optional[torch.dtype],
                need_grad: bool):
        # x [N, D], weight [V, D], bias [V] or None, target [N] -> summed loss (0-dim)
        vocab, rows_in = weight.size(0), x.size(0)
        chunk_rows = chunk_rows_for(x.device, vocab, low_precision is not None)
        real = (target != PAD_ID).nonzero()[:, 0]  # [M] rows with a loss: one device sync per batch, not per chunk
        x, target = x.index_select(0, real), target.index_select(0, real)  # padding rows never enter the loop
        count = x.size(0)
        w = weight.to(low_precision) if low_precision is not None else weight  # [V, D]
        low = w.dtype != torch.float32
        # the C kernel (float32 CPU x, weight and bias): float32, and bfloat16's products on the CPU
        fused = loss_kernel.usable(x, weight, *([] if bias is None else [bias])) and w.dtype in (torch.float32,
                                                                                                  torch.bfloat16)
        # [D, V]: MKL's float32 product takes the transposed view as fast (and the copy cost 3.9 ms per Multi30k
        # batch); elsewhere once, where a transposed operand was copied at every product
        w_t = w.t() if fused and not low else w.t().contiguous()
        if low and x.device.type == "cpu":  # rows added up to whole chunks, so that every product has one of a
            x = F.pad(x, (0, 0, 0, -count % chunk_rows))  # few shapes: oneDNN builds a kernel per shape; they get
            target = F.pad(target, (0, x.size(0) - count), value=PAD_ID)  # no loss and no gradient
        grad_x = torch.empty_like(x, dtype=torch.float32) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_grad and bias is not None else None
        bias_w = bias.to(w.dtype) if low and bias is not None and not fused else bias  # added inside the product
        group_rows = max(1, LOW_PRECISION_GROUP_ROWS // chunk_rows) * chunk_rows  # whole chunks
        group_grads = x.new_empty((min(group_rows, x.size(0)), vocab), dtype=w.dtype) if need_grad and low else None
        total = x.new_zeros((), dtype=torch.float32)
        target_grad = torch.full((chunk_rows, 1), -(1 - label_smoothing), device=x.device)  # the one-hot's share
        # every chunk's logits and softmax go into the same buffers: fresh 8 MB tensors per chunk made the loss
        # of a Multi30k-sized batch (3,900 rows) 10 % slower here
        rows_max = min(chunk_rows, x.size(0))
        product_buffer = x.new_empty((rows_max, vocab), dtype=w.dtype)  # the product's output, in w's type
        logits_buffer = x.new_empty((rows_max, vocab), dtype=torch.float32) if low and not fused else product_buffer
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            xc, tc = x[rows].to(w.dtype), target[rows]
            n = xc.size(0)
            valid = min(n, count - start)  # the chunk's rows that are not the added ones
            in_group, end = start % group_rows, start + n
            if fused:  # bias, softmax, loss and the gradient's target share in one C kernel; in bfloat16 the
                # gradient goes into the weight gradient's group rows, in float32 over the logits
                logits = torch.mm(xc, w_t, out=product_buffer[:n])  # [n, V]
                grad_rows = group_grads[in_group:in_group + n] if low and need_grad else logits  # [n, V]
                lse, target_logit, logit_sum, bias_sums = loss_kernel.softmax_loss(
                    logits[:valid], bias, tc[:valid], -(1 - label_smoothing) if need_grad else 0.0,
                    need_grad and bias is not None, out=grad_rows[:valid] if low else None)
                total += _smoothed_loss(lse, target_logit, logit_sum / vocab if label_smoothing else None,
                                        label_smoothing)
                if not need_grad:
                    continue
                if grad_b is not None:
                    grad_b += bias_sums
                if not low:
                    grad_x[rows] = torch.mm(logits, w)
                    grad_w.addmm_(logits.t(), xc)
                    continue
                grad_low = grad_rows
                grad_low[valid:] = 0.0  # the added rows
            else:
                if bias is None:
                    logits = torch.mm(xc, w_t, out=product_buffer[:n])  # [n, V]
                else:
                    logits = torch.addmm(bias_w, xc, w_t, out=product_buffer[:n])  # [n, V]
                if low:
                    logits = logits_buffer[:n].copy_(logits)  # float32
                # what the loss needs of the logits, taken before the softmax overwrites them
                target_logit = logits[:valid].gather(1, tc[:valid, None])[:, 0]  # [valid]
                mean_logit = logits[:valid].mean(-1) if label_smoothing else None  # [valid]
                # one fused kernel that works row by row (a row stays in the L1 cache), where max, subtract, exp and
                # sum as separate ops each streamed the whole chunk through memory; the softmax is also the gradient.
                # In place: a second [n, V] buffer cost a third more memory traffic (Multi30k: 4.7 against 7.2 ms
                # per 1,048-row chunk, AMD EPYC, 2 threads)
                probs = torch.softmax(logits, dim=-1, out=logits)  # [n, V]

                def logits_of(row_index, xc=xc):  # recomputed for the few rows whose target probability underflows
                    chosen = xc[:valid].index_select(0, row_index)
                    out = torch.mm(chosen, w_t) if bias is None else torch.addmm(bias_w, chosen, w_t)
                    return out.float()

                total += _smoothed_nll(target_logit, mean_logit, probs[:valid], tc[:valid], label_smoothing, logits_of)
                if not need_grad:
                    continue
                # d loss / d logits = softmax - (1 - eps) onehot - eps / V, zero on the added rows; the constant
                # - eps / V is added to the three gradients after the loop (``_add_uniform_share``)
                grad = probs.scatter_add_(1, tc[:, None], target_grad[:n])
                if valid < n:
                    grad[valid:] = 0.0
                if grad_b is not None:
                    grad_b += grad.sum(0)
                if not low:
                    grad_x[rows] = torch.mm(grad, w)
                    grad_w.addmm_(grad.t(), xc)
                    continue
                grad_low = group_grads[in_group:in_group + n]
                grad_low.copy_(grad)
            grad_x[rows] = torch.mm(grad_low, w)
            if end % group_rows == 0 or end == x.size(0):  # the group's weight gradient, one product
                group_start = start - in_group
                grad_w += torch.mm(group_grads[:end - group_start].t(), x[group_start:end].to(w.dtype)).float()
        if need_grad and label_smoothing:
            _add_uniform_share(-label_smoothing / vocab, x[:count].to(w.dtype), w, grad_x[:count], grad_w, grad_b)
        if need_grad:
            grad_x = grad_x.new_zeros((rows_in, grad_x.size(1))).index_copy_(0, real, grad_x[:count])  # padding: 0
            ctx.save_for_backward(grad_x, grad_w, grad_b)
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w, grad_b = ctx.saved_tensors  # float32; scaled first, then cast (fp16 would overflow)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return ((grad_x * grad_total).to(x_dtype), (grad_w * grad_total).to(w_dtype),
                None if grad_b is None else (grad_b * grad_total).to(b_dtype), None, None, None, None)


def chunk_rows_for(device: torch.device, vocab: int, low_precision: bool = False) -> int:
    """Rows per chunk: the most that hold fewer than CHUNK_LOGITS logits, at least CHUNK_ROWS; CHUNK_ROWS for
    bfloat16 on the CPU (its products' rows are padded to whole chunks, and its chunk size was measured on an
    Intel Xeon with AMX)."""
    if low_precision and device.type == "cpu":
        return CHUNK_ROWS
    return max(CHUNK_ROWS, (CHUNK_LOGITS - 1) // vocab)


def _smoothed_nll(target_logit: torch.Tensor, mean_logit: Optional[torch.Tensor], probs: torch.Tensor,
                  target: torch.Tensor, eps: float, logits_of) -> torch.Tensor:
    """Summed -(1 - eps) log p(target) - eps mean_v log p(v) of rows with target logits [n], mean logits [n]
    (with eps) and softmax [n, V].

    log p(v) = logit(v) - lse, and lse = logit(target) - log p(target) comes from the softmax, which saves
    a log-softmax pass; where p(target) is too small for that (below 1e-30), the row's logits are computed
    again (``logits_of(row_index)`` [k, V]) and their log-sum-exp taken.
    """
    target_prob = probs.gather(1, target[:, None])[:, 0]  # [n]
    tiny = target_prob < 1e-30
    lse = target_logit - torch.log(target_prob)  # [n]
    if tiny.any():
        rows = tiny.nonzero()[:, 0]
        lse[rows] = torch.logsumexp(logits_of(rows), dim=-1)
    return _smoothed_loss(lse, target_logit, mean_logit, eps)


def _smoothed_loss(lse: torch.Tensor, target_logit: torch.Tensor, mean_logit: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    """Summed -(1 - eps) log p(target) - eps mean_v log p(v) from rows' log-sum-exp, target logits and (with
    eps) mean logits [n]."""
    loss = (1 - eps) * (lse - target_logit)
    if eps:
        loss += eps * (lse - mean_logit)
    return loss.sum()


def _add_uniform_share(share: float, x: torch.Tensor, w: torch.Tensor, grad_x: torch.Tensor, grad_w: torch.Tensor,
                       grad_b) -> None:
    """Add ``share`` to every logit's gradient, for rows x [M, D] of weight w [V, D]: as products with a
    constant matrix these are a vector per row (grad_x), per vocabulary entry (grad_w) and one number (grad_b),
    where adding it chunk by chunk was a pass over every [n, V] gradient."""
    grad_x += share * w.float().sum(0)  # [D] to every row
    grad_w += share * x.float().sum(0)  # [D] to every vocabulary entry
    if grad_b is not None:
        grad_b += share * x.size(0)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                         label_smoothing: float = 0.0, low_precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """Summed cross-entropy of ``x @ weight.T + bias`` against ``target`` (PAD positions ignored).

    x [..., D], target [...]. ``low_precision`` (torch.bfloat16) runs the three matrix products in that
    type with float32 accumulation; softmax and loss stay in float32.
    """
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))  # validation computes no gradients
    with torch.autocast(x.device.type, enabled=False):  # the precision is chosen here, explicitly
        return _LinearCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, bias, target.reshape(-1),
                                         label_smoothing, low_precision, need_grad)
