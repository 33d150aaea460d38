"""Dev-set tuning of the search settings: a small grid of beam sizes and length penalties.

Each (beam, alpha) translates the model's validation split and is scored with BLEU; the best (ties go
to the smaller beam, then the smaller alpha) can be saved as the model directory's ``search.yaml``,
which :meth:`Translator.from_dir` then uses as its default search settings (command-line options
still override it). Greedy search (beam 1) ignores alpha, so it is run once, with the first alpha.

``seq2seq-tune --model DIR [--beams 1,3,5,10] [--alphas 0,0.6,1.0] [--max-sentences N] [--save]``
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import yaml

from seq2seq.checkpoint import atomic_write_bytes, load_bundle
from seq2seq.cli import USER_ERRORS, fail
from seq2seq.config import SearchConfig
from seq2seq.data import load_split
from seq2seq.metrics import bleu
from seq2seq.runtime import set_decoding_runtime
from seq2seq.shortlist import Shortlist
from seq2seq.translate import SEARCH_FILE, Translator, read_search_defaults


@dataclass
class Trial:
    beam: int
    alpha: float
    bleu: float
    sentences_per_second: float


@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial
    search: SearchConfig  # the model's search defaults with the best beam and alpha


def grid(beams: Sequence[int], alphas: Sequence[float]) -> list[tuple[int, float]]:
    """Every (beam, alpha), in order; beam 1 once (greedy ignores alpha)."""
    pairs = []
    for beam in beams:
        for alpha in alphas[:1] if beam == 1 else alphas:
            if (beam, alpha) not in pairs:
                pairs.append((beam, alpha))
    return pairs


def tune(model_dir: str | Path, beams: Sequence[int] = (1, 3, 5, 10), alphas: Sequence[float] = (0.0, 0.6, 1.0),
         max_sentences: int = 0, device: str = "auto", batch_size: Optional[int] = None,
         split: Optional[str] = None, shortlist: bool = False, workers: int = 1) -> TuneResult:
    """Translate the validation split (or ``split``) with every grid point and score it (with ``shortlist``,
    over the model directory's lexical shortlist, as ``translate --shortlist`` would; ``workers`` as
    translate's: the same translations, batches side by side)."""
    bundle = load_bundle(model_dir)
    lexical = None
    if shortlist:
        lexical = Shortlist.of_model(model_dir, len(bundle.src_tokenizer), len(bundle.tgt_tokenizer))
    defaults = read_search_defaults(model_dir, bundle.config.search)
    pairs = load_split(bundle.config.data, split or bundle.config.data.valid_split)
    if max_sentences:
        pairs = pairs[:max_sentences]
    sources, refs = [s for s, _ in pairs], [r for _, r in pairs]
    trials = []
    for beam, alpha in grid(beams, alphas):
        cfg = replace(defaults, beam_size=beam, alpha=alpha, batch_size=batch_size or defaults.batch_size)
        translator = Translator(bundle, cfg, device, workers=workers, shortlist=lexical)
        start = time.perf_counter()
        hyps = [nbest[0].text for nbest in translator.translate(sources)]
        seconds = time.perf_counter() - start
        trials.append(Trial(beam, alpha, bleu(hyps, refs).score, len(sources) / max(seconds, 1e-9)))
    best = min(trials, key=lambda t: (-t.bleu, t.beam, t.alpha))
    return TuneResult(trials, best, replace(defaults, beam_size=best.beam, alpha=best.alpha))


def save_search_config(model_dir: str | Path, cfg: SearchConfig) -> Path:
    """Write ``cfg`` as the model directory's search.yaml (atomically)."""
    path = Path(model_dir) / SEARCH_FILE
    atomic_write_bytes(path, yaml.safe_dump(asdict(cfg), sort_keys=False).encode("utf-8"))
    return path


def format_table(result: TuneResult) -> str:
    lines = [f"{'beam':>4}  {'alpha':>5}  {'BLEU':>6}  {'sent/s':>8}"]
    for t in result.trials:
        mark = "  <- best" if t is result.best else ""
        lines.append(f"{t.beam:>4}  {t.alpha:>5.2f}  {t.bleu:>6.2f}  {t.sentences_per_second:>8.1f}{mark}")
    return "\n".join(lines)


def parse_list(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"--{name} must be a comma-separated list of {kind.__name__} values, got {text!r}")
    if not values:
        fail(f"--{name} is empty")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seq2seq-tune",
                                     description="Try beam sizes and length penalties on the validation split.")
    parser.add_argument("--model", required=True, help="model directory written by training")
    parser.add_argument("--beams", default="1,3,5,10", help="comma-separated beam sizes (default 1,3,5,10)")
    parser.add_argument("--alphas", default="0,0.6,1.0", help="comma-separated length penalties (default 0,0.6,1.0)")
    parser.add_argument("--max-sentences", type=int, default=0, help="use only the first N sentences (0 = all)")
    parser.add_argument("--split", help="the data split to tune on (default: the model's validation split)")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="CPU: translate this many batches side by side, each on --threads / N threads")
    parser.add_argument("--shortlist", action="store_true", help="decode over the model's lexical shortlist")
    parser.add_argument("--save", action="store_true", help=f"write the best settings to MODEL/{SEARCH_FILE}")
    args = parser.parse_args(argv)
    beams, alphas = parse_list(args.beams, int, "beams"), parse_list(args.alphas, float, "alphas")
    if min(beams) < 1 or min(alphas) < 0:
        fail("beam sizes must be at least 1 and alphas at least 0")
    if args.max_sentences < 0 or (args.batch_size is not None and args.batch_size < 1):
        fail("--max-sentences must be >= 0 and --batch-size >= 1")
    set_decoding_runtime(args.threads, args.workers)
    try:
        result = tune(args.model, beams, alphas, args.max_sentences, args.device, args.batch_size, args.split,
                      args.shortlist, args.workers)
    except USER_ERRORS as err:
        fail(str(err))
    print(format_table(result))
    print(f"best: beam {result.best.beam}, alpha {result.best.alpha} (BLEU {result.best.bleu:.2f})")
    if args.save:
        print(f"saved: {save_search_config(args.model, result.search)}")
