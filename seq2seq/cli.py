"""Command-line entry points (``seq2seq-train``, ``seq2seq-translate``, ``seq2seq-evaluate``).

Errors a user can fix are printed as one line (``error: ...``) with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import codecs
import io
import logging
import os
import sys
from pathlib import Path

from seq2seq.alignment import AlignmentError, AttentionWriter
from seq2seq.checkpoint import ModelDirError
from seq2seq.config import ConfigError
from seq2seq.data import DataError
from seq2seq.runtime import DeviceError, set_decoding_runtime
from seq2seq.tokenizer import TokenizerError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
USER_ERRORS = (ConfigError, DataError, ModelDirError, DeviceError, TokenizerError)
log = logging.getLogger("seq2seq")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --- train -------------------------------------------------------------------------------------
def train_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from seq2seq.config import to_config
    from seq2seq.resume import ResumeError
    from seq2seq.train import TrainingError, train

    if not CONF_DIR.is_dir():
        fail(f"config directory {CONF_DIR} not found: install seq2seq from its repository with pip install -e .")

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def run(cfg) -> None:
        try:
            config = to_config(cfg)
            summary = train(config, HydraConfig.get().runtime.output_dir)
        except (*USER_ERRORS, TrainingError, ResumeError) as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted; resume with trainer.resume=true and the same hydra.run.dir")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
            print(f"model directory: {summary['model_dir']}")

    run()


# --- translate ---------------------------------------------------------------------------------
def add_search_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, nargs="+",
                        help="model directory written by training; several make an ensemble (same vocabularies)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy; default: the model's)")
    parser.add_argument("--alpha", type=float, default=None, help="GNMT length penalty alpha")
    parser.add_argument("--length-penalty", choices=("gnmt", "average"), default=None,
                        help="gnmt (with --alpha) or average (score / length)")
    parser.add_argument("--stopping", choices=("bound", "early"), default=None,
                        help="beam search: bound (exact) or early (stop once the best extension ends; faster)")
    parser.add_argument("--min-len", type=int, default=None, help="no end of sentence before this many tokens")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, help="never repeat an n-gram of this size")
    parser.add_argument("--forbid-unk", action="store_true", default=None, help="never output <unk>")
    parser.add_argument("--max-len-a", type=float, default=None, help="max output length = a * source length + b")
    parser.add_argument("--max-len-b", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default 64)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="CPU: translate this many batches side by side, each on --threads / N threads")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 dynamic quantisation of linear and GRU/LSTM layers (CPU only)")
    parser.add_argument("--bf16", action="store_true",
                        help="the decoder's matrix products in bfloat16 (fast on CPUs with AMX / AVX512-BF16)")
    parser.add_argument("--shortlist", action="store_true",
                        help="cut each batch's output layer to the model's lexical shortlist (faster; build it "
                             "once with seq2seq-shortlist --model DIR)")


def load_translator(args: argparse.Namespace):
    from seq2seq.translate import Translator

    for name in ("beam", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    set_decoding_runtime(args.threads, args.workers)
    return Translator.from_dirs(args.model, device=args.device, beam_size=args.beam, alpha=args.alpha,
                                max_len_a=args.max_len_a, max_len_b=args.max_len_b, batch_size=args.batch_size,
                                length_penalty=args.length_penalty, stopping=args.stopping, min_len=args.min_len,
                                no_repeat_ngram=args.no_repeat_ngram, forbid_unk=args.forbid_unk,
                                quantize=args.quantize, bf16=args.bf16, workers=args.workers,
                                shortlist=args.shortlist)


class InvalidUtf8Counter:
    """A codecs error handler: replaces invalid UTF-8 with U+FFFD, warns once, counts the rest."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        if self.count == 0:
            log.warning("invalid UTF-8 in the input is replaced by U+FFFD")
        self.count += 1
        return "\ufffd", err.end


INVALID_UTF8 = "seq2seq-invalid-utf8"
invalid_utf8 = InvalidUtf8Counter()
codecs.register_error(INVALID_UTF8, invalid_utf8)


def one_line(text: str) -> str:
    """The text with every line separator (``str.splitlines`` knows eleven) turned into a space."""
    return " ".join(text.splitlines()) if text else text


def translate_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seq2seq-translate", description="Translate lines of text.")
    add_search_args(parser)
    parser.add_argument("--input", help="input file (default: standard input)")
    parser.add_argument("--output", help="output file (default: standard output)")
    parser.add_argument("--n-best", type=int, default=1,
                        help="with N > 1, write up to N lines per input line (one for an empty line): "
                             "index<TAB>score<TAB>translation, best first")
    parser.add_argument("--attention-json", metavar="FILE",
                        help="write each line's attention (of the best translation) as JSON lines")
    parser.add_argument("--attention-png", metavar="DIR", help="draw each line's attention as DIR/{index}.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.n_best < 1:
        fail(f"--n-best must be at least 1, got {args.n_best}")
    try:
        translator = load_translator(args)
        attention = AttentionWriter.open(translator.model, args.attention_json, args.attention_png)
        if args.n_best > translator.search_cfg.beam_size:
            fail(f"--n-best {args.n_best} needs --beam of at least {args.n_best}")
        if args.input:
            if not Path(args.input).is_file():
                fail(f"{args.input}: input file not found")
            source = open(args.input, encoding="utf-8", errors=INVALID_UTF8, newline="\n")
        else:
            source = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors=INVALID_UTF8, newline="\n")
        sink = (open(args.output, "w", encoding="utf-8", newline="\n") if args.output
                else io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", line_buffering=False))
        with source, sink, attention:
            for index, nbest in enumerate(translator.translate_stream(source, n_best=args.n_best,
                                                                      return_attention=attention.active)):
                attention.add(index, nbest[0])
                if args.n_best == 1:
                    sink.write(one_line(nbest[0].text) + "\n")
                else:
                    for hyp in nbest:
                        sink.write(f"{index}\t{hyp.score:.4f}\t{one_line(hyp.text)}\n")
    except (*USER_ERRORS, AlignmentError) as err:
        fail(str(err))
    if invalid_utf8.count:
        log.warning("%d invalid UTF-8 sequences were replaced", invalid_utf8.count)


# --- evaluate ----------------------------------------------------------------------------------
def evaluate_main(argv: list[str] | None = None) -> None:
    from seq2seq.evaluate import evaluate

    parser = argparse.ArgumentParser(prog="seq2seq-evaluate",
                                     description="Translate a test set and score it with sacreBLEU.")
    add_search_args(parser)
    parser.add_argument("--src", help="source file (with --ref)")
    parser.add_argument("--ref", help="reference file (with --src)")
    parser.add_argument("--split", help="a split of the model's data config, e.g. test (default: its test split)")
    parser.add_argument("--data",
                        help="a data config YAML to use instead of the model's (e.g. conf/data/multi30k.yaml)")
    parser.add_argument("--out", help="directory for hypotheses and report.json (default: MODEL/eval-SPLIT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if bool(args.src) != bool(args.ref):
        fail("--src and --ref go together")
    try:
        translator = load_translator(args)
        report = evaluate(translator, src=args.src, ref=args.ref, split=args.split, data_yaml=args.data,
                          out_dir=args.out, model_dir=args.model[0])
    except USER_ERRORS as err:
        fail(str(err))
    print(report["bleu"]["text"])
    print(report["chrf"]["text"])
    print(f"report: {report['report_path']}")
