"""Embedding + (bidirectional, stacked) RNN / GRU / LSTM over packed sequences."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import ModelConfig
from seq2seq.models.dropout import Dropout


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=True,
                  dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity="tanh", **kwargs)


@dataclass
class EncoderOutput:
    """What the decoder conditions on. ``select`` re-indexes the batch (all beam search needs)."""

    memory: torch.Tensor  # [B, S, He] top-layer states at every source position
    mask: torch.Tensor  # [B, S] True at real (non-padding) positions
    final: torch.Tensor  # [L_enc, B, He] last state of each layer, directions concatenated
    final_cell: Optional[torch.Tensor] = None  # [L_enc, B, He] LSTM cell states
    keys: Optional[torch.Tensor] = None  # [B, S, A] attention keys, projected once per batch
    context: Optional[torch.Tensor] = None  # [B, He] fixed context vector (Cho et al. mode)

    def select(self, index: torch.Tensor) -> "EncoderOutput":
        def pick(t: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(dim, index)

        return replace(self, memory=pick(self.memory), mask=pick(self.mask), final=pick(self.final, 1),
                       final_cell=pick(self.final_cell, 1), keys=pick(self.keys), context=pick(self.context))


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

    def _merge_directions(self, state: torch.Tensor) -> torch.Tensor:
        # [L * dirs, B, H] -> [L, B, dirs * H]
        layers, batch = self.num_layers, state.size(1)
        state = state.view(layers, self.directions, batch, -1)
        return torch.cat([state[:, d] for d in range(self.directions)], dim=-1)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, packed: bool = True) -> EncoderOutput:
        """src [B, S] ids, src_len [B] lengths (>= 1)."""
        mask = src != 0  # padding id is 0
        if packed:
            mask = torch.arange(src.size(1), device=src.device)[None, :] < src_len[:, None]
        embedded = self.emb_dropout(self.embedding(src))  # [B, S, E]
        if packed:
            packed_input = pack_padded_sequence(embedded, src_len.cpu(), batch_first=True, enforce_sorted=False)
            packed_output, state = self.rnn(packed_input)
            memory, _ = pad_packed_sequence(packed_output, batch_first=True, total_length=src.size(1))
        else:
            memory, state = self.rnn(embedded)
        hidden, cell = state if isinstance(state, tuple) else (state, None)
        return EncoderOutput(
            memory=self.dropout(memory),
            mask=mask,
            final=self._merge_directions(hidden),
            final_cell=self._merge_directions(cell) if cell is not None else None,
        )
