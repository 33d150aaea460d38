"""Sentencepiece subwords. The sentencepiece ids are the vocabulary: pad, unk, bos, eos are 0-3."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from seq2seq.config import TokenizerConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A sentencepiece model is missing, unreadable or does not fit the model."""


class Tokenizer:
    """One sentencepiece model: text <-> ids (ids never include bos/eos)."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises bare RuntimeError/OSError on bad files
            raise TokenizerError(f"{source}: not a valid sentencepiece model ({err})") from None
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(f"{source}: special ids must be pad=0 unk=1 bos=2 eos=3")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: sentencepiece model not found")
        return cls(path.read_bytes(), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def encode_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        # one call per sentence: sentencepiece's batch call starts a thread pool each time, 86 against 3 us for
        # the one sentence a translation decodes
        return [self.sp.decode([i for i in seq if i > EOS_ID]) for seq in ids]

    def id_to_piece(self, ids: Iterable[int]) -> list[str]:
        return self.sp.id_to_piece([int(i) for i in ids])


def train_tokenizer(sentences: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train sentencepiece on ``sentences``; the vocabulary size is a soft limit on small data."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hard_vocab_limit=False,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        minloglevel=2,
        num_threads=2,
    )
    return Tokenizer(model.getvalue())


def train_tokenizers(pairs: Sequence[tuple[str, str]], cfg: TokenizerConfig) -> tuple[Tokenizer, Tokenizer]:
    """Source and target tokenizers: the same object when the vocabulary is joint."""
    if cfg.joint:
        joint = train_tokenizer((s for pair in pairs for s in pair), cfg)
        log.info("trained a joint sentencepiece %s model with %d pieces", cfg.model_type, len(joint))
        return joint, joint
    src = train_tokenizer((s for s, _ in pairs), cfg)
    tgt = train_tokenizer((t for _, t in pairs), cfg)
    log.info("trained sentencepiece %s models with %d / %d pieces", cfg.model_type, len(src), len(tgt))
    return src, tgt
