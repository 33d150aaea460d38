"""The recurrent decoder. ``advance`` is its one step; training, greedy and beam search all use it.

Conditioning modes (``ModelConfig.attention``):
- ``none``: Cho et al. 2014. A fixed context vector (the encoder's final state) is fed to the RNN at
  every step and to the output layer.
- ``bahdanau``: additive attention whose query is the previous decoder state; the context is fed to
  the RNN and the output layer (with input feeding, the previous pre-output vector is fed too, as in
  Joey NMT and OpenNMT-py).
- ``luong_dot`` / ``luong_general`` / ``luong_concat``: the RNN steps first, then attends with its new state
  (concat: the additive score v . tanh(W_q h + W_k m), as OpenNMT-py's and Joey NMT's recurrent decoders);
  the attentional vector tanh(W [h; c]) predicts the word and, with input feeding, is fed to the next step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import ModelConfig
from seq2seq.models import context_products, decoder_loop
from seq2seq.models.attention import AdditiveAttention, MultiplicativeAttention
from seq2seq.models.cell import cell_weight_list, rnn_cell_step
from seq2seq.models.dropout import Dropout
from seq2seq.models.encoder import EncoderOutput, make_rnn
from seq2seq.models.output_loss import linear_cross_entropy
from seq2seq.models.packed import PACKED_LINEAR, LinearRows, output_logits
from seq2seq.models.tanh import tanh_
from seq2seq.models.weight_cache import DecodingWeights, embedding_gates, versions


@dataclass
class DecoderState:
    hidden: torch.Tensor  # [L, B, D]
    cell: Optional[torch.Tensor] = None  # [L, B, D] (LSTM only)
    feed: Optional[torch.Tensor] = None  # [B, D] previous attentional vector (Luong input feeding)

    def select(self, index: torch.Tensor) -> "DecoderState":
        return replace(self, hidden=self.hidden.index_select(1, index),
                       cell=None if self.cell is None else self.cell.index_select(1, index),
                       feed=None if self.feed is None else self.feed.index_select(0, index))


# bfloat16 products pad their rows to a multiple of this: oneDNN builds a kernel per matrix shape (1-2.5 ms
# each here), and training batches vary in size and search shrinks its batch. 50 training batches on
# Multi30k spent 1.4 s building kernels unpadded, 0.26 s padded to 32 (with set_threads' cache of 128)
ROW_MULTIPLE = 32

PACK_ROWS = 64  # the row count the output layer's decoding layout is chosen for: a greedy step of a batch of 64


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        enc_size, dec_size, emb_size = cfg.enc_hidden_size, cfg.dec_hidden_size, cfg.emb_size
        self.luong = cfg.attention.startswith("luong")
        self.input_feeding = cfg.input_feeding and cfg.attention != "none"
        self.embedding = nn.Embedding(vocab_size, emb_size, padding_idx=0)
        self.emb_dropout = Dropout(cfg.emb_dropout)
        self.dropout = Dropout(cfg.dropout)

        rnn_input = emb_size + (dec_size if self.input_feeding else 0) + (0 if self.luong else enc_size)  # [y; h~; c]
        self.rnn = make_rnn(cfg.cell, rnn_input, dec_size, cfg.dec_layers, cfg.dropout)
        if cfg.attention in ("bahdanau", "luong_concat"):
            self.attention = AdditiveAttention(dec_size, enc_size, cfg.attention_size)
        elif self.luong:
            self.attention = MultiplicativeAttention(dec_size, enc_size, general=cfg.attention == "luong_general")
        else:
            self.attention = None
        # the attentional / pre-output vector: Luong tanh(W [h; c]); otherwise tanh(W [h; y; c])
        pre_output_input = dec_size + enc_size + (0 if self.luong else emb_size)
        self.pre_output = nn.Linear(pre_output_input, dec_size)
        self.output = nn.Linear(dec_size, vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.embedding.weight
        # a run-time choice (translate --bf16; trainer.precision=bf16 on the CPU): the step's matrix products
        # and the output layer in bfloat16, the elementwise work in float32 (see ``linear``)
        self.bf16_products = False
        self._decoding_cache = DecodingWeights()  # weights prepared once for decoding (weight_cache.py)
        self.compile_step = False  # a run-time choice (trainer.compile): torch.compile the step of the training loop
        self._compiled = {}
        if cfg.bridge == "learned":
            self.bridge = nn.Linear(enc_size, dec_size)
            self.bridge_cell = nn.Linear(enc_size, dec_size) if cfg.cell == "lstm" else None

    # --- set-up, once per batch ---------------------------------------------------------------
    def prepare(self, enc: EncoderOutput, vocab: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Add what every step needs but only depends on the source: projected keys, context vector, and
        with ``vocab`` (a batch's shortlist [V'], sorted target ids) the output layer cut to those rows;
        ``allowed`` [B, V'] (bool) limits each sentence to its own part of them."""
        keys = self.attention.project_keys(enc.memory) if self.attention is not None else None
        context = enc.final[-1] if self.attention is None else None
        rows = bias = None
        if vocab is not None:
            vocab = vocab.to(enc.memory.device)
            rows = LinearRows.of(*self._output_parameters(), vocab, PACK_ROWS)
        if allowed is not None:
            bias = torch.zeros(allowed.shape, device=enc.memory.device).masked_fill_(
                ~allowed.to(enc.memory.device), float("-inf"))  # [B, V']
        return replace(enc, keys=keys, context=context, vocab=vocab, output_rows=rows, vocab_bias=bias)

    def _output_parameters(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The output layer's float32 weight [V, D] and bias [V], also where it is int8-quantised."""
        if isinstance(self.output, nn.Linear):
            return self.output.weight, self.output.bias
        return self.output.weight().dequantize(), self.output.bias()

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        layers, batch = self.cfg.dec_layers, enc.memory.size(0)
        if self.cfg.bridge == "zeros":
            hidden = enc.memory.new_zeros(layers, batch, self.cfg.dec_hidden_size)
            cell = hidden.clone() if self.cfg.cell == "lstm" else None
        elif self.cfg.bridge == "copy":
            hidden, cell = self._copy_layers(enc.final), self._copy_layers(enc.final_cell)
        else:
            hidden = torch.tanh(self.bridge(enc.final[-1])).expand(layers, -1, -1).contiguous()
            cell = None
            if self.bridge_cell is not None:
                cell = torch.tanh(self.bridge_cell(enc.final_cell[-1])).expand(layers, -1, -1).contiguous()
        feed = enc.memory.new_zeros(batch, self.cfg.dec_hidden_size) if self.input_feeding else None
        return DecoderState(hidden, cell, feed)

    def _copy_layers(self, final: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Encoder layer i starts decoder layer i; with fewer encoder layers the top one is repeated."""
        if final is None:
            return None
        layers = self.cfg.dec_layers
        if final.size(0) >= layers:
            return final[-layers:].contiguous()
        return torch.cat([final, final[-1:].expand(layers - final.size(0), -1, -1)], dim=0).contiguous()

    # --- the step -----------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb_dropout(self.embedding(tokens))

    def project(self, pre_output: torch.Tensor) -> torch.Tensor:
        """pre-output vectors [..., D] -> logits [..., V]"""
        if self.bf16_products:
            return self.linear(self.dropout(pre_output), self.output.weight, self.output.bias)
        if self._packs_output(pre_output):  # decoding: the weight reordered once (packed.output_logits)
            return output_logits(self.output, self._decoding_cache, self.dropout(pre_output), PACK_ROWS)
        return self.output(self.dropout(pre_output))

    def _packs_output(self, pre_output: torch.Tensor) -> bool:
        """float32 decoding on the CPU, where oneDNN can keep the output layer's weight in its own layout."""
        return (PACKED_LINEAR and not torch.is_grad_enabled() and pre_output.device.type == "cpu"
                and pre_output.dtype == torch.float32 and type(self.output) is nn.Linear  # not int8-quantised
                and not torch.is_autocast_enabled("cpu"))  # autocast would cast the op's weight to bfloat16

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., I] @ weight [O, I].T + bias -> float32 [..., O]; F.linear, unless ``bf16_products`` is set.

        Then the product runs in bfloat16 (the CPU's AMX units run it several times faster than float32)
        and everything around it in float32: the result goes to float32 before the bias is added, as
        bfloat16 elementwise ops run ~3x slower than float32 on CPUs (which is why autocast lost).
        In decoding the weight's bfloat16 copy is made once, transposed, not at every step (casting per
        step cost as much as the product); training casts the step's recurrent weights once per batch
        (``cell_weights``) and the rest at each call. The rows are padded to a multiple of ``ROW_MULTIPLE``.
        """
        if not self.bf16_products:
            return F.linear(x, weight, bias)
        if torch.is_grad_enabled():  # cast at each call: a fused optimizer step updates a weight without
            weight_t = weight.to(torch.bfloat16).t()  # [I, O]   changing its version, so a cache would go stale
        else:
            weight_t = self._decoding_cache.kept(("bf16", id(weight)), (weight.device, *versions([weight])),
                                                 lambda: weight.detach().t().contiguous().to(torch.bfloat16))
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # [R, I]
        rows = flat.size(0)
        out = torch.mm(F.pad(flat, (0, 0, 0, -rows % ROW_MULTIPLE)), weight_t)[:rows].float()  # [R, O]
        if bias is not None:
            out.add_(bias)
        return out.view(*x.shape[:-1], out.size(-1))

    def drop_cached_weights(self) -> None:
        """Forget the weights prepared for decoding. Their key holds the weights' versions, but a fused optimizer
        step updates a weight in place without changing its version: ``train_step`` calls this after every update."""
        self._decoding_cache.clear()

    def advance(self, embedded: torch.Tensor, state: DecoderState, enc: EncoderOutput,
                emb_gates: Optional[torch.Tensor] = None, cell_weights: Optional[list] = None):
        """One step. embedded [B, E] -> (pre-output [B, D], new state, attention [B, S] or None)."""
        output, context, state, attn = self.recur(embedded, state, enc, emb_gates, cell_weights)
        pre_output = self.pre_output_of(output, embedded, context, enc.context_memory is not None)
        if self.input_feeding:
            state = replace(state, feed=pre_output)
        return pre_output, state, attn

    def recur(self, embedded: torch.Tensor, state: DecoderState, enc: EncoderOutput,
              emb_gates: Optional[torch.Tensor] = None, cell_weights: Optional[list] = None):
        """The recurrent half of a step: -> (RNN output [B, D], context [B, He], new state, attention).

        For the Cho and Bahdanau modes the pre-output layer needs nothing from later steps, so
        training runs this half step by step and the pre-output layer once over all positions.
        ``emb_gates`` [B, G*D] is the first RNN layer's input product with the embedding, when
        training has computed it for all positions at once (``embedding_products``), and
        ``cell_weights`` the cell's weights, made once per sequence (``cell_weights``). With
        ``enc.context_memory`` the context returned is its product with the pre-output layer (context_products).
        """
        attn, projected = None, enc.context_memory is not None
        if self.luong:
            extra = [state.feed] if self.input_feeding else []
        else:
            if self.attention is not None:  # Bahdanau: attend with the previous top-layer state
                context, attn = self._attend(state.hidden[-1], enc)
            else:
                context = enc.context  # [B, He], repeated to [R, He] for beam search (see ``_attend``)
                if context.size(0) != embedded.size(0):
                    context = context.repeat_interleave(embedded.size(0) // context.size(0), dim=0)
            extra = [context] + ([state.feed] if self.input_feeding else [])
            if projected:  # layer 0's share of the context's products, then the pre-output's (context_products)
                gate_share, context = context.split([context.size(-1) - self.cfg.dec_hidden_size,
                                                     self.cfg.dec_hidden_size], dim=-1)
                emb_gates = gate_share + (self.embedding_products(embedded) if emb_gates is None else emb_gates)
                extra = extra[1:]
        if self.manual_cell:
            linear = self.linear if self.bf16_products else F.linear
            if self.bf16_products and not torch.is_grad_enabled():  # decoding: layer 0's whole input product at once
                emb_gates = linear(torch.cat([embedded] + extra, dim=-1), self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
                extra = []
            elif emb_gates is None:
                emb_gates = self.embedding_products(embedded)
            weights = cell_weights or self.cell_weights(without_context=projected and not self.luong)
            output, hidden, cell = self._maybe_compiled("cell", rnn_cell_step)(
                self.cfg.cell, weights, self.rnn.dropout, self.training, emb_gates, extra, state.hidden, state.cell,
                linear)
        else:  # e.g. a quantised RNN module: one step of it
            hx = (state.hidden, state.cell) if state.cell is not None else state.hidden
            output, new_hx = self.rnn(torch.cat([embedded] + extra, dim=-1)[:, None, :], hx)
            hidden, cell = new_hx if isinstance(new_hx, tuple) else (new_hx, None)
            output = output[:, 0]
        if self.luong:
            context, attn = self._attend(output, enc)
        return output, context, DecoderState(hidden, cell, state.feed), attn

    def _attend(self, query: torch.Tensor, enc: EncoderOutput):
        """query [R, Q] -> (context [R, He], attention weights [R, S]). R is a multiple of the encoder's batch
        B: consecutive groups of R / B rows attend to one source sentence (beam search's hypotheses of a
        sentence), so that the encoder output is neither copied per hypothesis nor read once per hypothesis.
        With ``enc.context_memory`` [B, S, P] the context is its weighted sum: [R, P] (context_products)."""
        memory = enc.memory if enc.context_memory is None else enc.context_memory
        query = query.view(memory.size(0), -1, query.size(-1))  # [B, R / B, Q]
        if enc.attention_steps is not None:  # training's loop (AdditiveAttention.step_gradients)
            context, attn = self.attention(query, enc.keys, memory, enc.mask,
                                           linear=self.linear if self.bf16_products else None,
                                           steps=enc.attention_steps)
        elif self.bf16_products:
            context, attn = self.attention(query, enc.keys, memory, enc.mask, linear=self.linear)
        else:
            context, attn = self._maybe_compiled("attention", self.attention)(query, enc.keys, memory, enc.mask)
        return context.reshape(-1, context.size(-1)), attn.reshape(-1, attn.size(-1))

    def pre_output_of(self, output: torch.Tensor, embedded: torch.Tensor, context: torch.Tensor,
                      projected: bool = False) -> torch.Tensor:
        """Luong tanh(W [h; c]), otherwise tanh(W [h; y; c]); any leading shape ([B] or [B, T]). ``projected``:
        the context [B, D] is already W_c c + b (context_products), and W takes only [h] or [h; y]."""
        parts = [output, context] if self.luong else [output, embedded, context]
        if projected:  # Luong's [h] is not copied
            inputs = parts[0] if self.luong else torch.cat(parts[:-1], dim=-1)
            return tanh_(torch.addmm(context, inputs, context_products.other_columns(self)))
        if self.bf16_products:
            return tanh_(self.linear(torch.cat(parts, dim=-1), self.pre_output.weight, self.pre_output.bias))
        return tanh_(self.pre_output(torch.cat(parts, dim=-1)))

    def step(self, prev_tokens: torch.Tensor, state: DecoderState, enc: EncoderOutput):
        """prev_tokens [R] -> (logits [R, V], new state, attention [R, S] or None). Pure: writes nothing.
        state has R rows; enc has R or R / K (K hypotheses per sentence in consecutive rows, see ``_attend``).
        With a shortlist (``enc.vocab``), tokens and logits [R, V'] are positions in the batch's vocabulary."""
        if enc.vocab is not None:
            prev_tokens = enc.vocab[prev_tokens]
        gates = self._gates_of(prev_tokens)  # Luong's step then needs no embedding: the table holds its product
        embedded = None if self.luong and gates is not None else self.embed(prev_tokens)
        pre_output, state, attn = self.advance(embedded, state, enc, gates)
        if enc.output_rows is None:
            return self.project(pre_output), state, attn
        logits = enc.output_rows(self.dropout(pre_output))  # [R, V']
        if enc.vocab_bias is not None:  # each sentence's own shortlist; R = B or B * K (see _attend)
            logits.view(enc.vocab_bias.size(0), -1, logits.size(-1)).add_(enc.vocab_bias[:, None, :])
        return logits, state, attn

    # --- the RNN cell, written out so that the embedding's share of layer 0 is one product per batch ---
    @property
    def manual_cell(self) -> bool:
        return isinstance(self.rnn, (nn.GRU, nn.LSTM, nn.RNN))  # not a quantised module

    def _gates_of(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """float32 decoding: layer 0's product with the embeddings of tokens [R], looked up (``embedding_gates``)."""
        if (self.training or torch.is_grad_enabled() or not self.manual_cell or self.bf16_products
                or torch.is_autocast_enabled(tokens.device.type)):
            return None
        w_ih = self.rnn.weight_ih_l0[:, :self.cfg.emb_size]  # the embedding's columns
        return embedding_gates(self._decoding_cache, self.embedding.weight, w_ih, self.rnn.bias_ih_l0, tokens)

    def embedding_products(self, embedded: torch.Tensor) -> Optional[torch.Tensor]:
        """embedded [B, T, E] -> its layer-0 input product plus bias [B, T, G*D], for all positions at once."""
        if not self.manual_cell:
            return None
        emb_size = embedded.size(-1)
        return self.linear(embedded, self.rnn.weight_ih_l0[:, :emb_size], self.rnn.bias_ih_l0)

    def cell_weights(self, without_context: bool = False) -> list:
        """Per layer (w_ih, w_hh, b_ih, b_hh) for :func:`rnn_cell_step`: layer 0's w_ih is only its columns
        for the inputs after the embedding (``without_context``: after the context too, whose products
        come from ``context_products``), contiguous, and under autocast every weight (in training with
        ``bf16_products`` every matrix) is already in its type, so that a loop over time steps slices and
        casts nothing. Training makes them once per batch; decoding keeps them (``_decoding_cache``)."""
        device = self.rnn.weight_hh_l0.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        if torch.is_grad_enabled():  # bf16_products: matrices in bfloat16, biases float32 (see ``linear``)
            return cell_weight_list(self.rnn, self.cfg.emb_size, torch.bfloat16 if self.bf16_products else dtype,
                                    self.bf16_products)
        skip = self.cfg.emb_size + (self.cfg.enc_hidden_size if without_context else 0)
        return self._decoding_cache.kept(("cell", skip), (dtype, *versions(self.rnn.parameters())),
                                         lambda: cell_weight_list(self.rnn, skip, dtype))

    # --- whole sequences (teacher forcing) --------------------------------------------------------
    @property
    def can_fuse(self) -> bool:
        """RNN inputs do not depend on earlier outputs: the RNN can run over the sequence in one call."""
        return self.attention is None or (self.luong and not self.input_feeding)

    def forward(self, tgt_in: torch.Tensor, enc: EncoderOutput, state: Optional[DecoderState] = None,
                fused: Optional[bool] = None, return_attention: bool = False):
        """tgt_in [B, T] -> logits [B, T, V] (and attention [B, T, S] when asked; None without attention)."""
        pre_output, attn = self.pre_outputs(tgt_in, enc, state, fused)
        logits = self.project(pre_output)  # one matrix product over all positions
        return (logits, attn) if return_attention else logits

    def loss(self, tgt_in: torch.Tensor, tgt_out: torch.Tensor, enc: EncoderOutput, label_smoothing: float = 0.0,
             fused: Optional[bool] = None) -> torch.Tensor:
        """Summed cross-entropy over the real tokens of tgt_out [B, T], never holding all logits at once."""
        pre_output, _ = self.pre_outputs(tgt_in, enc, None, fused)
        return linear_cross_entropy(self.dropout(pre_output), self.output.weight, self.output.bias, tgt_out,
                                    label_smoothing, self._low_precision(pre_output.device))

    def _low_precision(self, device: torch.device) -> Optional[torch.dtype]:
        """bfloat16 for the output layer under bf16 autocast, or where ``bf16_products`` is set (as ``project``)."""
        if self.bf16_products or (torch.is_autocast_enabled(device.type)
                                and torch.get_autocast_dtype(device.type) == torch.bfloat16):
            return torch.bfloat16
        return None  # fp16 autocast keeps this layer in float32: its small gradients would underflow

    def pre_outputs(self, tgt_in: torch.Tensor, enc: EncoderOutput, state: Optional[DecoderState] = None,
                    fused: Optional[bool] = None):
        """tgt_in [B, T] -> (pre-output vectors [B, T, D], attention [B, T, S] or None)."""
        state = state if state is not None else self.init_state(enc)
        embedded = self.embed(tgt_in)  # [B, T, E], all positions at once
        fused = self.can_fuse if fused is None else fused
        if fused and self.can_fuse:
            return self._fused(embedded, state, enc)
        emb_gates = self.embedding_products(embedded)  # [B, T, G*D] or None
        if emb_gates is not None and decoder_loop.usable(self, emb_gates, enc.memory):  # the peers' decoder
            return decoder_loop.pre_outputs(self, emb_gates, state.hidden[0], state.feed, enc)
        gates = [None] * tgt_in.size(1) if emb_gates is None else emb_gates.unbind(1)
        weights = self.cell_weights() if self.manual_cell else None
        if isinstance(self.attention, AdditiveAttention) and not self.compile_step:  # keys' gradients summed once
            enc = replace(enc, attention_steps=self.attention.step_gradients(enc.keys, enc.memory, enc.mask))
        # unbind, not embedded[:, t]: each indexing's backward would add a zeroed [B, T, E] gradient
        steps = embedded.unbind(1)
        if self.input_feeding:  # each step needs the previous pre-output
            outputs, attns = [], []
            for t in range(tgt_in.size(1)):
                out, state, a = self.advance(steps[t], state, enc, gates[t], weights)
                outputs.append(out)
                attns.append(a)
            pre_output = torch.stack(outputs, dim=1)  # [B, T, D]
            attn = torch.stack(attns, dim=1)
        else:  # the recurrent half step by step, the pre-output layer once for all positions
            outputs, contexts, attns = [], [], []
            for t in range(tgt_in.size(1)):
                out, context, state, a = self.recur(steps[t], state, enc, gates[t], weights)
                outputs.append(out)
                contexts.append(context)
                attns.append(a)
            pre_output = self.pre_output_of(torch.stack(outputs, 1), embedded, torch.stack(contexts, 1))
            attn = torch.stack(attns, dim=1) if attns[0] is not None else None
        return pre_output, attn

    def _maybe_compiled(self, name: str, function):
        """``function`` itself, or through torch.compile when ``compile_step`` is set (compiled once, for any batch and
        source size): fewer, fused kernels per step, at a cost per call of its own; ``bf16_products`` steps: eager."""
        if not self.compile_step or self.bf16_products:
            return function
        if name not in self._compiled:
            self._compiled[name] = torch.compile(function, dynamic=True)
        return self._compiled[name]

    def _fused(self, embedded: torch.Tensor, state: DecoderState, enc: EncoderOutput):
        hx = (state.hidden, state.cell) if state.cell is not None else state.hidden
        if self.luong:
            output, _ = self.rnn(embedded, hx)  # [B, T, D]
            context, attn = self.attention(output, enc.keys, enc.memory, enc.mask)
            return self.pre_output_of(output, embedded, context), attn
        context = enc.context[:, None, :].expand(-1, embedded.size(1), -1)  # [B, T, He]
        output, _ = self.rnn(torch.cat([embedded, context], dim=-1), hx)
        return self.pre_output_of(output, embedded, context), None
