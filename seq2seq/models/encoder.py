"""Embedding + (bidirectional, stacked) RNN / GRU / LSTM over packed sequences."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import ModelConfig
from seq2seq.models import gru_kernel
from seq2seq.models.dropout import Dropout, dropout


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=True,
                  dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity="tanh", **kwargs)


def gru_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
              b_hh: torch.Tensor) -> torch.Tensor:
    """One direction of one GRU layer from a zero state, x [B, S, I] -> outputs [B, S, H], as torch.gru computes
    it, with the input product for all positions at once and the recurrence as one autograd node around the
    C kernel (``gru_kernel.gru_recurrence``): ATen's loop records a dozen autograd nodes per step."""
    return gru_kernel.gru_recurrence(F.linear(x, w_ih, b_ih), w_hh, b_hh)  # gates_in [B, S, 3H]


def _reorder(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, S, H] -> x[b, positions[b, s]] for every b, s."""
    return x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1)))


@dataclass
class EncoderOutput:
    """What the decoder conditions on. ``select`` re-indexes the batch (all beam search needs)."""

    memory: torch.Tensor  # [B, S, He] top-layer states at every source position
    mask: torch.Tensor  # [B, S] True at real (non-padding) positions
    final: torch.Tensor  # [L_enc, B, He] last state of each layer, directions concatenated
    final_cell: Optional[torch.Tensor] = None  # [L_enc, B, He] LSTM cell states
    keys: Optional[torch.Tensor] = None  # [B, S, A] attention keys, projected once per batch
    context: Optional[torch.Tensor] = None  # [B, He] fixed context vector (Cho et al. mode)
    # decoding with a shortlist (seq2seq/shortlist.py): the batch's target vocabulary [V'] (sorted ids; the
    # step's tokens and logits are positions in it), the output layer cut to it (packed.LinearRows), and
    # [B, V'] 0 / -inf: each sentence's own part of it
    vocab: Optional[torch.Tensor] = None
    output_rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    vocab_bias: Optional[torch.Tensor] = None
    # training's step-by-step decoder: the additive attention's keys, memory and mask with their gradients summed
    # over the steps at once (AdditiveAttention.step_gradients); a batch's own, so ``select`` drops it
    attention_steps: Optional[object] = None
    # decoding: the memory's products with the weights that take the context (models/context_products.py)
    context_memory: Optional[torch.Tensor] = None  # [B, S, P]

    def select(self, index: torch.Tensor) -> "EncoderOutput":
        def pick(t: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(dim, index)

        return replace(self, memory=pick(self.memory), mask=pick(self.mask), final=pick(self.final, 1),
                       final_cell=pick(self.final_cell, 1), keys=pick(self.keys), context=pick(self.context),
                       vocab_bias=pick(self.vocab_bias), attention_steps=None, context_memory=pick(self.context_memory))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embedding: Optional[nn.Embedding] = None):
        super().__init__()
        self.embedding = embedding if embedding is not None else nn.Embedding(vocab_size, cfg.emb_size, padding_idx=0)
        self.emb_dropout = Dropout(cfg.emb_dropout)
        self.directions = 2 if cfg.bidirectional else 1
        self.rnn = make_rnn(cfg.cell, cfg.emb_size, cfg.enc_hidden_size // self.directions, cfg.enc_layers,
                            cfg.dropout, cfg.bidirectional)
        self.dropout = Dropout(cfg.dropout)
        self.num_layers = cfg.enc_layers
        self.hidden_size = cfg.enc_hidden_size

    def _runs_by_direction(self, device: torch.device) -> bool:
        """Whether ``_by_direction`` runs this RNN: a float GRU or tanh RNN (an LSTM's final cell state is not
        among its outputs; a quantised module has no plain weights), on the CPU, where it was measured (on
        GPUs packed sequences are one cuDNN call)."""
        plain = type(self.rnn) is nn.GRU or (type(self.rnn) is nn.RNN and self.rnn.nonlinearity == "tanh")
        return plain and device.type == "cpu"

    def _by_direction(self, embedded: torch.Tensor, src_len: torch.Tensor, mask: torch.Tensor):
        """The GRU / RNN over padded sentences as packed sequences would give it, layer by layer and one call
        per direction: the forward direction reads the padding only after the last word, and the backward
        direction reads each sentence reversed within its length, so padding never reaches a real position.
        Why: PyTorch's packed path on the CPU multiplies the inputs step by step, the unpacked one all positions
        at once; a bi-GRU's forward and backward over Multi30k training batches took 72 instead of 92 ms here.
        -> (memory [B, S, He], zero at padding; final states [L * dirs, B, H] in nn.GRU's order)."""
        rnn, batch, length = self.rnn, embedded.size(0), embedded.size(1)
        step_fn = torch.gru if isinstance(rnn, nn.GRU) else torch.rnn_tanh
        positions = torch.arange(length, device=embedded.device)[None, :]  # [1, S]
        last = (src_len - 1).to(embedded.device)  # [B]
        reverse = torch.where(mask, last[:, None] - positions, positions)  # [B, S], its own inverse
        rows, finals, layer_input = torch.arange(batch, device=embedded.device), [], embedded
        h0 = embedded.new_zeros(1, batch, rnn.hidden_size)
        for layer in range(rnn.num_layers):
            if layer > 0:
                layer_input = dropout(layer_input, rnn.dropout, self.training)
            outputs = []
            for direction, suffix in enumerate(["", "_reverse"][: self.directions]):
                params = [getattr(rnn, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                               "bias_hh")]
                x = _reorder(layer_input, reverse) if direction else layer_input
                if (step_fn is torch.gru and gru_kernel.usable(x, *params)
                        and not torch.is_autocast_enabled(x.device.type)):  # autocast: its products in bf16
                    out = gru_layer(x, *params)  # [B, S, H]
                else:
                    out, _ = step_fn(x, h0, params, True, 1, 0.0, self.training, False, True)  # [B, S, H]
                finals.append(out[rows, last])  # [B, H] after the last word
                outputs.append(_reorder(out, reverse) if direction else out)
            layer_input = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        memory = layer_input * mask[:, :, None]  # [B, S, He]
        return memory, torch.stack(finals)  # finals in nn.GRU's order: layer-major, forward then backward

    def _merge_directions(self, state: torch.Tensor) -> torch.Tensor:
        # [L * dirs, B, H] -> [L, B, dirs * H]
        layers, batch = self.num_layers, state.size(1)
        state = state.view(layers, self.directions, batch, -1)
        return torch.cat([state[:, d] for d in range(self.directions)], dim=-1)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, packed: bool = True) -> EncoderOutput:
        """src [B, S] ids, src_len [B] lengths (>= 1). ``packed=False`` runs the RNN over the padding as if
        it were words (a batch without padding only)."""
        mask = src != 0  # padding id is 0
        if packed:
            mask = torch.arange(src.size(1), device=src.device)[None, :] < src_len[:, None]
        embedded = self.emb_dropout(self.embedding(src))  # [B, S, E]
        if packed and not self._runs_by_direction(src.device):
            packed_input = pack_padded_sequence(embedded, src_len.cpu(), batch_first=True, enforce_sorted=False)
            packed_output, state = self.rnn(packed_input)
            memory, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=src.size(1))
        elif packed:
            memory, state = self._by_direction(embedded, src_len, mask)
        else:
            memory, state = self.rnn(embedded)
        hidden, cell = state if isinstance(state, tuple) else (state, None)
        return EncoderOutput(
            memory=self.dropout(memory),
            mask=mask,
            final=self._merge_directions(hidden),
            final_cell=self._merge_directions(cell) if cell is not None else None,
        )
