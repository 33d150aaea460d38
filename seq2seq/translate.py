"""Translator: a loaded model directory that turns lines of text into translations, in batches.

Every input line gives exactly one output: empty and whitespace-only lines give an empty line, over-long
lines are cut to ``data.truncate_len`` pieces with a warning, and input is read in bounded chunks so
a file of any size streams through in bounded memory.

Search settings come from the training config, then the model directory's ``search.yaml`` (written by
``seq2seq-tune --save``), then explicit overrides. Several model directories make an ensemble
(:mod:`seq2seq.ensemble`).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import yaml

from seq2seq.batch import make_batch, sentence_batches
from seq2seq.checkpoint import Bundle, ModelDirError, load_bundle
from seq2seq.config import ConfigError, SearchConfig, merge_into
from seq2seq.ensemble import load_ensemble
from seq2seq.models.decoder import Decoder
from seq2seq.runtime import quantize_int8, resolve_device, warn_if_slow_bf16
from seq2seq.search import Hypothesis, search
from seq2seq.shortlist import Shortlist

log = logging.getLogger(__name__)
SEARCH_FILE = "search.yaml"  # default search settings in a model directory (written by seq2seq-tune)


def read_search_defaults(model_dir: str | Path, base: SearchConfig) -> SearchConfig:
    """``base`` updated with the model directory's search.yaml when it has one (yaml.safe_load only)."""
    path = Path(model_dir) / SEARCH_FILE
    if not path.is_file():
        return base
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{path}: unreadable ({type(err).__name__}); fix or delete the file") from None
    if not isinstance(values, dict):
        raise ModelDirError(f"{path}: must be a YAML mapping of search settings")
    try:
        return merge_into(base, values, str(path))
    except ConfigError as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise ModelDirError(f"{path}: bad search settings ({detail}); fix or delete the file") from None


@dataclass
class Translation:
    text: str
    score: float
    pieces: list[str]  # target pieces
    src_pieces: list[str]
    attention: Optional[torch.Tensor] = None  # [len(pieces) + 1, len(src_pieces)]


class Translator:
    def __init__(self, bundle: Bundle, search_cfg: Optional[SearchConfig] = None, device: str = "auto",
                 quantize: bool = False, bf16: bool = False, workers: int = 1, shortlist: Optional[Shortlist] = None):
        """``workers`` > 1 (CPU only): that many threads translate batches side by side, sharing the model.
        Set their torch threads with ``runtime.set_decoding_runtime(threads, workers)``. ``shortlist``: each
        batch's output layer cut to its lexical shortlist (:mod:`seq2seq.shortlist`)."""
        self.device = resolve_device(device)
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if workers > 1 and self.device.type != "cpu":
            raise ConfigError(f"--workers {workers} translates batches side by side on CPU cores; "
                              "on a GPU use one worker and a larger --batch-size")
        self.workers = workers
        self.shortlist = shortlist
        self._pool: Optional[ThreadPoolExecutor] = None
        self.bundle = bundle
        self.model = bundle.model.to(self.device).eval()
        if quantize and bf16:
            raise ConfigError("--quantize (int8) and --bf16 are two different ways to speed up decoding: choose one")
        if quantize:
            if self.device.type != "cpu":
                raise ConfigError("int8 quantisation runs on the CPU only: add --device cpu")
            self.model = quantize_int8(self.model)
        # bf16: the step's products in bfloat16 from weights cast once, which on a CPU with bf16 units beat
        # autocast of the whole step (a cast per product); a CPU without them gets a warning
        if bf16:
            if self.device.type == "cpu":
                warn_if_slow_bf16("--bf16")
            for module in self.model.modules():
                if isinstance(module, Decoder):
                    module.bf16_products = True
        self.search_cfg = search_cfg or bundle.config.search
        self.search_cfg.validate()
        self.max_src_len = bundle.config.data.truncate_len

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", **search_overrides) -> "Translator":
        """Search settings: the training config's, then the directory's search.yaml, then the overrides."""
        return cls._with_defaults(load_bundle(model_dir), model_dir, device, search_overrides)

    @classmethod
    def from_dirs(cls, model_dirs: list[str | Path], device: str = "auto", **search_overrides) -> "Translator":
        """One directory: :meth:`from_dir`. Several: an ensemble, with the first one's tokenizers, config
        and search defaults."""
        if len(model_dirs) == 1:
            return cls.from_dir(model_dirs[0], device, **search_overrides)
        return cls._with_defaults(load_ensemble(model_dirs), model_dirs[0], device, search_overrides)

    @classmethod
    def _with_defaults(cls, bundle: Bundle, model_dir: str | Path, device: str, overrides: dict) -> "Translator":
        quantize, bf16 = bool(overrides.pop("quantize", False)), bool(overrides.pop("bf16", False))
        workers = overrides.pop("workers", None)
        shortlist = None
        if overrides.pop("shortlist", False):  # the first model directory's (an ensemble shares its vocabularies)
            shortlist = Shortlist.of_model(model_dir, len(bundle.src_tokenizer), len(bundle.tgt_tokenizer))
        search_cfg = read_search_defaults(model_dir, bundle.config.search)
        search_cfg = replace(search_cfg, **{k: v for k, v in overrides.items() if v is not None})
        return cls(bundle, search_cfg, device, quantize, bf16, 1 if workers is None else workers, shortlist)

    def translate(self, lines: list[str], n_best: int = 1, return_attention: bool = False) -> list[list[Translation]]:
        """Translate a list of lines; each gets an n-best list (best first)."""
        src_tok = self.bundle.src_tokenizer
        results: list[list[Translation]] = [[] for _ in lines]
        todo = [i for i, line in enumerate(lines) if line.strip()]
        ids = src_tok.encode([lines[i].strip() for i in todo])
        for i, seq in zip(todo, ids):
            if len(seq) > self.max_src_len:
                log.warning("line %d has %d source pieces; only the first %d are translated", i + 1, len(seq),
                            self.max_src_len)
        ids = [seq[: self.max_src_len] for seq in ids]

        def search_batch(group: list[int]) -> list[list[Hypothesis]]:
            batch = make_batch([ids[g] for g in group])
            vocab = allowed = None
            if self.shortlist is not None:
                vocab, allowed = self.shortlist.for_batch(batch.src)
            batch = batch.to(self.device)
            return search(self.model, batch.src, batch.src_len, self.search_cfg, n_best=n_best,
                          return_attention=return_attention, vocab=vocab, allowed=allowed)

        groups = list(sentence_batches([len(s) for s in ids], self.search_cfg.batch_size))
        for group, hyps in zip(groups, self._map(search_batch, groups)):
            for g, nbest in zip(group, hyps):
                results[todo[g]] = [self._to_translation(h, ids[g]) for h in nbest[:n_best]]
        for i, line in enumerate(lines):
            if not results[i]:
                results[i] = [Translation("", 0.0, [], [])]
        return results

    def _map(self, function, groups: list) -> Iterable:
        """``function`` over the batches, in order; with several workers, batches run side by side.

        Each worker takes the next batch when it finishes one. Two workers of one thread each decoded test2016
        1.15-1.31x (greedy) and 1.01-1.21x (beam 5) as fast as one worker with both threads, with the same
        translations, beam 5 at up to 0.10 GiB more peak memory (AMD EPYC, 2 vCPUs; ``scripts/benchmark.py
        --decode-workers 1,2``, rounds H to J in docs/benchmark-history.md): much of a step is small work that one
        core does without waiting for the other. The workers inherit the main thread's floating-point flags (flush
        denormals to zero, ``runtime.set_threads``) when they start."""
        if self.workers == 1 or len(groups) < 2:
            return map(function, groups)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="seq2seq-decode")
        return self._pool.map(function, groups)

    def _to_translation(self, hyp: Hypothesis, src_ids: list[int]) -> Translation:
        src_tok, tgt_tok = self.bundle.src_tokenizer, self.bundle.tgt_tokenizer
        score = hyp.normalized_score if hyp.normalized_score is not None else hyp.score
        return Translation(tgt_tok.decode([hyp.tokens])[0], score, tgt_tok.id_to_piece(hyp.tokens),
                           src_tok.id_to_piece(src_ids), hyp.attention)

    def translate_stream(self, lines: Iterable[str], chunk_size: int = 0, n_best: int = 1,
                         return_attention: bool = False) -> Iterator[list[Translation]]:
        """Translate an iterable of lines chunk by chunk, yielding results in input order."""
        chunk_size = chunk_size or self.search_cfg.batch_size * 16
        iterator = iter(lines)
        while chunk := list(islice(iterator, chunk_size)):
            yield from self.translate([line.rstrip("\r\n") for line in chunk], n_best, return_attention)
