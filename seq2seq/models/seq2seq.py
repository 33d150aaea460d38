"""The encoder-decoder model: ``encode`` once, then ``init_state`` and ``step`` (or ``forward``)."""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import ConfigError, ModelConfig
from seq2seq.models import context_products
from seq2seq.models.decoder import Decoder, DecoderState
from seq2seq.models.encoder import Encoder, EncoderOutput
from seq2seq.tokenizer import PAD_ID


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        if cfg.share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ConfigError("model.share_embeddings=true needs a joint vocabulary (data.tokenizer.joint=true)")
        self.cfg = cfg
        self.decoder = Decoder(cfg, tgt_vocab_size)
        self.encoder = Encoder(cfg, src_vocab_size, self.decoder.embedding if cfg.share_embeddings else None)
        if cfg.init == "uniform":
            with torch.no_grad():
                for parameter in self.parameters():  # a shared parameter comes once
                    parameter.uniform_(-cfg.init_range, cfg.init_range)
                for embedding in (self.encoder.embedding, self.decoder.embedding):
                    embedding.weight[PAD_ID].zero_()  # padding stays a zero vector

    def encode(self, src: torch.Tensor, src_len: torch.Tensor, vocab: Optional[torch.Tensor] = None,
               allowed: Optional[torch.Tensor] = None) -> EncoderOutput:
        """src [B, S], src_len [B] -> encoder output with attention keys projected; ``vocab``: a shortlist
        of target ids [V'] the steps' logits are cut to, ``allowed`` [B, V'] (see ``Decoder.prepare``)."""
        return self.decoder.prepare(self.encoder(src, src_len), vocab, allowed)

    def prepare_decoding(self, enc: EncoderOutput) -> EncoderOutput:
        """What only decoding steps need, added to ``encode``'s output once per batch: the context's products
        over the memory (models/context_products.py), where they apply."""
        return replace(enc, context_memory=context_products.project(self.decoder, enc.memory))

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return self.decoder.init_state(enc)

    def step(self, prev_tokens: torch.Tensor, state: DecoderState, enc: EncoderOutput):
        """prev_tokens [B] -> (logits [B, V], state, attention [B, S] or None)."""
        return self.decoder.step(prev_tokens, state, enc)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor,
                teacher_forcing: float = 1.0, fused: Optional[bool] = None, tgt_out: Optional[torch.Tensor] = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for target inputs tgt_in [B, T].

        Given the targets tgt_out [B, T], returns their summed cross-entropy instead (as
        ``sequence_loss`` of the logits, but without holding them all: see models/output_loss.py).
        A loss is what training needs, and it goes through ``forward`` so DistributedDataParallel sees it.
        """
        enc = self.encode(src, src_len)
        if teacher_forcing >= 1.0:
            if tgt_out is not None:
                return self.decoder.loss(tgt_in, tgt_out, enc, label_smoothing, fused)
            return self.decoder(tgt_in, enc, fused=fused)
        logits = self._scheduled_sampling(tgt_in, enc, teacher_forcing)
        return logits if tgt_out is None else sequence_loss(logits.float(), tgt_out, label_smoothing)

    def _scheduled_sampling(self, tgt_in: torch.Tensor, enc: EncoderOutput, ratio: float) -> torch.Tensor:
        """Each step feeds the reference token with probability ``ratio``, else the model's own best guess."""
        state = self.init_state(enc)
        prev, all_logits = tgt_in[:, 0], []
        for t in range(tgt_in.size(1)):
            logits, state, _ = self.step(prev, state, enc)
            all_logits.append(logits)
            if t + 1 < tgt_in.size(1):
                prev = tgt_in[:, t + 1] if random.random() < ratio else logits.argmax(-1).detach()
        return torch.stack(all_logits, dim=1)


def sequence_loss(logits: torch.Tensor, tgt_out: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over real target tokens: logits [B, T, V], tgt_out [B, T]."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=PAD_ID,
                           reduction="sum", label_smoothing=label_smoothing)
