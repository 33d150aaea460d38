"""Benchmark: training tokens/s, decoding sentences/s, peak memory and the share of the machine used.

    python scripts/benchmark.py --train-seconds 120 --model MODEL_DIR -- experiment=multi30k_gru

Each phase runs in a process of its own so its peak memory (ru_maxrss) is its own. Training speed is
measured like ../shared/peers does it: the median over steps after warm-up (the first max(20, 5%)
steps) of target tokens (with EOS, without padding) per second of step time. The machine's matrix
multiply rate (fp32, 2048^3) is measured in the same run, so the fraction of it that training achieves
compares across machines. Writes JSON and prints a Markdown table; ``--peer SUMMARY`` adds a peer toolkit's
figures from ../shared/peers (its ``runs/<toolkit>/summary.json``) and our ratio to each.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path
from queue import Empty

import torch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from seq2seq.config import to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose(config_name="train", overrides=overrides))


def matmul_rate(threads: int, size: int = 2048, repeats: int = 5, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """Measured matrix-multiply GFLOP/s (median of ``repeats``) on ``device`` in ``dtype``."""
    from seq2seq.runtime import cpu_has_bf16_products

    torch.set_num_threads(threads)
    if device != "cpu":
        size = max(size, 8192)  # enough work to fill a GPU
    elif dtype == torch.bfloat16 and not cpu_has_bf16_products():
        size = min(size, 512)  # its fallback runs at 1-2 GFLOP/s (AMD EPYC): 2048^3 would take a minute or more
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of this process on the CPU."""
    if device != "cpu":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mib()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_phase(overrides: list[str], seconds: float, threads: int, device: str, queue) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from seq2seq.batch import make_batch, token_batches
    from seq2seq.data import load_split
    from seq2seq.models.seq2seq import Seq2Seq
    from seq2seq.runtime import set_seed, set_training_runtime
    from seq2seq.step import train_step, use_precision
    from seq2seq.tokenizer import train_tokenizers
    from seq2seq.train import build_optimizer, encode_pairs

    cfg = compose(overrides)
    set_training_runtime(threads, cfg.trainer.precision, torch.device(device))
    set_seed(cfg.trainer.seed)
    pairs = load_split(cfg.data, cfg.data.train_split)
    src_tok, tgt_tok = train_tokenizers(pairs, cfg.data.tokenizer)
    src, tgt = encode_pairs(pairs, src_tok, tgt_tok, cfg.data.max_len)
    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok)).to(device).train()
    optimizer, _ = build_optimizer(model, cfg)
    t = cfg.trainer
    use_precision(model, t.precision, torch.device(device))
    model.decoder.compile_step = t.compile
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    step_times, step_tokens, start, epoch = [], [], time.perf_counter(), 0
    flop_per_token = None
    while time.perf_counter() - start < seconds:
        groups = token_batches([len(s) for s in src], [len(x) for x in tgt], t.batch_tokens, t.seed, epoch,
                               t.batch_multiple)
        for first in range(0, len(groups), t.accumulate):  # a step takes trainer.accumulate batches
            batches = [make_batch([src[i] for i in group], [tgt[i] for i in group])
                       for group in groups[first: first + t.accumulate]]
            tokens = sum(batch.num_tgt_tokens for batch in batches)
            if flop_per_token is None:
                # one step in eager mode, counted; with bfloat16's products off, as their rows are padded
                # (decoder.ROW_MULTIPLE, the loss's chunks) and the padding is not the model's arithmetic
                bf16_products, model.decoder.bf16_products = model.decoder.bf16_products, False
                with FlopCounterMode(display=False) as counter:
                    model.decoder.compile_step = False
                    train_step(model, [batch.to(device) for batch in batches], optimizer, t, scaler=scaler)
                    model.decoder.compile_step = t.compile
                model.decoder.bf16_products = bf16_products
                flop_per_token = counter.get_total_flops() / tokens
                continue
            step_start = time.perf_counter()  # the copy to the device counts, as in training
            train_step(model, [batch.to(device) for batch in batches], optimizer, t, scaler=scaler)  # ends in .item()
            step_times.append(time.perf_counter() - step_start)
            step_tokens.append(tokens)
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    warmup = max(20, len(step_times) // 20)
    rates = [n / s for n, s in zip(step_tokens[warmup:], step_times[warmup:])] or [0.0]
    queue.put({"train_tokens_per_s": statistics.median(rates), "train_steps": len(step_times),
               "tokens_per_step": statistics.mean(step_tokens), "flop_per_token": flop_per_token,
               "train_peak_rss_mib": _peak_memory_mib(device)})


def _decode_phase(model_dir: str, threads: int, beam: int, batch_size: int, sentences: int, variant: str,
                  device: str, stopping: str, workers: int, queue) -> None:
    from seq2seq.data import load_split
    from seq2seq.metrics import bleu
    from seq2seq.runtime import set_decoding_runtime
    from seq2seq.translate import Translator

    set_decoding_runtime(threads, workers)
    precision, _, shortlist = variant.partition("+")
    translator = Translator.from_dir(model_dir, device=device, beam_size=beam, batch_size=batch_size,
                                     alpha=1.0 if beam > 1 else 0.0, stopping=stopping, bf16=precision == "bf16",
                                     quantize=precision == "int8", workers=workers, shortlist=shortlist == "shortlist")
    data = translator.bundle.config.data
    pairs = load_split(data, data.test_split)[:sentences]
    start = time.perf_counter()
    hyps = [n[0].text for n in translator.translate([s for s, _ in pairs])]
    _synchronize(device)
    seconds = time.perf_counter() - start
    queue.put({"beam": beam, "batch_size": batch_size, "variant": variant, "stopping": stopping if beam > 1 else "",
               "workers": workers,
               "sentences_per_s": len(pairs) / seconds,
               "bleu": bleu(hyps, [r for _, r in pairs]).score, "peak_rss_mib": _peak_memory_mib(device)})


# ../shared/peers decodes test2016 with batches of 64 sentences, GNMT alpha 1.0 and its toolkit's early stopping
PEER_BATCH_SIZE = 64


def load_peer(path: str) -> dict:
    """A peer toolkit's summary.json (../shared/peers/summarize.py); ValueError where it is not one."""
    try:
        peer = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--peer {path}: cannot read it as JSON ({error})") from None
    missing = [key for key in ("train", "train_time", "decode") if not isinstance(peer, dict) or
               not isinstance(peer.get(key), dict)]
    if missing:
        raise ValueError(f"--peer {path}: not a summary.json of ../shared/peers (no {', '.join(missing)})")
    return peer


def _decoding_label(d: dict) -> str:
    """One decoding run's variant, beam, stopping rule and workers, e.g. "bf16 beam 5 (early stopping, 2 workers)"."""
    notes = ([f"{d['stopping']} stopping"] if d["stopping"] else []) + (
        [f"{d['workers']} workers"] if d.get("workers", 1) > 1 else [])
    return f"{d['variant']} beam {d['beam']}" + (f" ({', '.join(notes)})" if notes else "")


def peer_comparison(result: dict, peer: dict) -> list[dict]:
    """Our figures beside a peer's: training tokens/s and peak memory, and each of our decodings at the peers'
    batch size beside theirs at the same beam. ``ratio`` is ours / theirs (above 1: faster, or more memory)."""
    rows = []

    def add(figure: str, ours, theirs) -> None:
        if ours is not None and theirs:
            rows.append({"figure": figure, "ours": ours, "theirs": theirs, "ratio": ours / theirs})

    if "train_tokens_per_s" in result:
        add("training, target tokens/s", result["train_tokens_per_s"], peer["train"].get("tgt_tok_per_s_median"))
        add("peak memory, training (MiB)", result["train_peak_rss_mib"], peer["train_time"].get("peak_rss_mib"))
    for d in result["decoding"]:
        if d["batch_size"] != PEER_BATCH_SIZE:
            continue
        theirs = peer["decode"].get(f"beam{d['beam']}") or {}  # {} where the peer did not decode with this beam
        label = _decoding_label(d)
        add(f"decoding {label}, sentences/s", d["sentences_per_s"], theirs.get("sent_per_s"))
        add(f"decoding {label}, peak memory (MiB)", d["peak_rss_mib"], theirs.get("process_peak_rss_mib"))
        add(f"decoding {label}, BLEU", d["bleu"], theirs.get("bleu"))
    return rows


def run_in_child(target, *args) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():  # it failed before reporting: its traceback is on stderr
                raise RuntimeError(f"the benchmark's {target.__name__} process failed (exit code {process.exitcode})")
    process.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="seq2seq-benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=multi30k_gru")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on CUDA, memory is torch's peak allocation")
    parser.add_argument("--train-seconds", type=float, default=120, help="0 = skip training")
    parser.add_argument("--model", help="model directory to decode its test split with (skip decoding without)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--beams", default="1,5")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--decode-variants", default="fp32",
                        help="comma-separated: fp32, bf16 (output layer in bfloat16), int8 (dynamic quantisation), "
                             "each optionally +shortlist (the model's lexical shortlist, e.g. fp32+shortlist)")
    parser.add_argument("--stopping", default="bound",
                        help="comma-separated beam-search stopping rules to decode with: bound, early")
    parser.add_argument("--decode-workers", default="1",
                        help="comma-separated: decoding threads side by side, each on --threads / N torch threads")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--peer", help="a peer toolkit's summary.json (../shared/peers/runs/<toolkit>/summary.json) "
                                       "to compare with: its figures and our ratio to each")
    args = parser.parse_args(argv)
    for variant in args.decode_variants.split(","):
        precision, plus, extra = variant.partition("+")
        if precision not in ("fp32", "bf16", "int8") or (plus and extra != "shortlist"):
            parser.error(f"--decode-variants: unknown variant {variant!r} (fp32, bf16 or int8, each optionally "
                         "+shortlist)")
    try:
        peer = load_peer(args.peer) if args.peer else None  # before the runs, so that a bad file fails at once
    except ValueError as error:
        parser.error(str(error))
    from seq2seq.runtime import autocast_dtype

    dtype = autocast_dtype(compose(args.overrides).trainer.precision) or torch.float32  # the run's matmul type
    result = {"threads": args.threads, "device": args.device, "overrides": args.overrides, "torch": torch.__version__,
              "matmul_dtype": str(dtype), "matmul_gflops": matmul_rate(args.threads, device=args.device, dtype=dtype)}
    if args.device != "cpu":
        result["gpu"] = torch.cuda.get_device_name(args.device)
    if args.train_seconds > 0:
        result.update(run_in_child(_train_phase, args.overrides, args.train_seconds, args.threads, args.device))
        achieved = result["train_tokens_per_s"] * result["flop_per_token"] / 1e9
        result["train_gflops"] = achieved
        result["fraction_of_matmul_rate"] = achieved / result["matmul_gflops"]
    decoding = []
    if args.model:
        for variant in args.decode_variants.split(","):
            for beam in map(int, args.beams.split(",")):
                for stopping in args.stopping.split(",") if beam > 1 else ["bound"]:
                    for batch_size in map(int, args.batch_sizes.split(",")):
                        for workers in map(int, args.decode_workers.split(",")):
                            decoding.append(run_in_child(_decode_phase, args.model, args.threads, beam, batch_size,
                                                         args.sentences, variant, args.device, stopping, workers))
    result["decoding"] = decoding
    if peer is not None:
        result["peer"] = {"path": args.peer, "toolkit": peer.get("toolkit", "peer"),
                          "comparison": peer_comparison(result, peer)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"| figure | value |\n|---|---|\n| device | {result.get('gpu', 'cpu')}, {args.threads} threads |")
    print(f"| matmul {dtype} | {result['matmul_gflops']:.0f} GFLOP/s |")
    if "train_tokens_per_s" in result:
        print(f"| training, target tokens/s (median) | {result['train_tokens_per_s']:,.0f} |")
        print(f"| target tokens per step | {result['tokens_per_step']:,.0f} |")
        print(f"| MFLOP per target token | {result['flop_per_token'] / 1e6:.1f} |")
        print(f"| share of the matmul rate | {result['fraction_of_matmul_rate']:.0%} |")
        print(f"| peak memory, training | {result['train_peak_rss_mib'] / 1024:.2f} GiB |")
    for d in decoding:
        print(f"| decoding {_decoding_label(d)}, batch {d['batch_size']}: sentences/s, BLEU, peak memory | "
              f"{d['sentences_per_s']:.0f}, {d['bleu']:.2f}, {d['peak_rss_mib'] / 1024:.2f} GiB |")
    if peer is not None:
        print(f"\n| figure | seq2seq | {result['peer']['toolkit']} | ratio |\n|---|---|---|---|")
        for row in result["peer"]["comparison"]:
            digits = 2 if "BLEU" in row["figure"] else 0
            ours, theirs = f"{row['ours']:,.{digits}f}", f"{row['theirs']:,.{digits}f}"
            print(f"| {row['figure']} | {ours} | {theirs} | {row['ratio']:.2f}x |")
    print(f"(written to {args.out})")
