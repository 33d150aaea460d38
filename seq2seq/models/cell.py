"""The decoder's RNN cell written out (``rnn_cell_step``): one step of a stacked GRU / LSTM / RNN that takes
layer 0's product with the embedding precomputed for all positions (one product per batch in training)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from seq2seq.models import gru_kernel
from seq2seq.models.dropout import dropout as fast_dropout
from seq2seq.models.tanh import tanh_


def rnn_cell_step(cell: str, weights: list, dropout: float, training: bool, emb_gates: torch.Tensor, extra: list,
                  hidden: torch.Tensor, cell_state: Optional[torch.Tensor], linear=F.linear):
    """One step of a stacked GRU / LSTM / RNN: the function nn.GRU etc. compute, written out.

    Layer 0's input is [embedding; *extra]; its product with the embedding (plus bias) comes in as
    ``emb_gates`` [B, G*D], and the ``extra`` vectors (context, fed vector) meet the rest of the input
    weight here. weights: per layer (w_ih, w_hh, b_ih, b_hh), layer 0's w_ih only the columns of the
    extra vectors (see ``Decoder.cell_weights``); hidden, cell_state [L, B, D]; ``linear`` computes the
    other products (F.linear, or ``Decoder.linear`` in bfloat16 decoding).
    Returns (top-layer output [B, D], hidden [L, B, D], cell state [L, B, D] or None).
    """
    gates_in = emb_gates
    if extra:
        inputs = extra[0] if len(extra) == 1 else torch.cat(extra, dim=-1)  # one (Luong's fed vector): not copied
        if linear is F.linear:
            gates_in = torch.addmm(emb_gates, inputs, weights[0][0].t())
        else:
            gates_in = emb_gates + linear(inputs, weights[0][0])
    hiddens, cells = [], []
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        if layer > 0:
            gates_in = linear(fast_dropout(hiddens[-1], dropout, training), w_ih, b_ih)
        h = hidden[layer]
        gates_h = linear(h, w_hh, b_hh)
        if cell == "gru" and gru_kernel.usable(gates_in, gates_h, h):
            h = gru_kernel.gru_cell(gates_in, gates_h, h)
        elif cell == "gru":
            in_r, in_z, in_n = gates_in.chunk(3, -1)
            h_r, h_z, h_n = gates_h.chunk(3, -1)
            reset, update = torch.sigmoid(in_r + h_r), torch.sigmoid(in_z + h_z)
            candidate = tanh_(in_n + reset * h_n)
            h = candidate + update * (h - candidate)
        elif cell == "lstm":
            i, f, g, o = (gates_in + gates_h).chunk(4, -1)
            c = torch.sigmoid(f) * cell_state[layer] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            cells.append(c)
        else:
            h = tanh_(gates_in + gates_h)
        hiddens.append(h)
    return hiddens[-1], _layers(hiddens), _layers(cells) if cells else None


def _layers(states: list) -> torch.Tensor:
    """[B, D] per layer -> [L, B, D]; one layer's as a view (torch.stack copies even one tensor)."""
    return states[0][None] if len(states) == 1 else torch.stack(states)


def cell_weight_list(rnn, skip: int, dtype: Optional[torch.dtype], float32_biases: bool = False) -> list:
    """Per layer of ``rnn`` (nn.GRU / LSTM / RNN) its (w_ih, w_hh, b_ih, b_hh), layer 0's w_ih without its first
    ``skip`` columns (contiguous), matrices (and, unless ``float32_biases``, biases) in ``dtype`` where given."""
    weights = []
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        if layer == 0:
            w_ih = w_ih[:, skip:].contiguous()  # [G*D, inputs after the skipped ones]
        if dtype is not None:
            w_ih, w_hh = w_ih.to(dtype), w_hh.to(dtype)
            if not float32_biases:
                b_ih, b_hh = b_ih.to(dtype), b_hh.to(dtype)
        weights.append((w_ih, w_hh, b_ih, b_hh))
    return weights
