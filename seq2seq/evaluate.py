"""Translate a test set with a model directory and score it (sacreBLEU BLEU and chrF, with signatures)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from seq2seq.checkpoint import atomic_write_bytes
from seq2seq.config import ConfigError, DataConfig, merge_into
from seq2seq.data import load_split, read_text_pair
from seq2seq.metrics import bleu, chrf
from seq2seq.translate import Translator


def load_data_config(base: DataConfig, data_yaml: Optional[str]) -> DataConfig:
    if not data_yaml:
        return base
    if not Path(data_yaml).is_file():
        raise ConfigError(f"{data_yaml}: data config not found")
    values = OmegaConf.load(data_yaml)
    values.pop("defaults", None)
    return merge_into(base, values, data_yaml)


def evaluate(translator: Translator, src: Optional[str] = None, ref: Optional[str] = None,
             split: Optional[str] = None, data_yaml: Optional[str] = None, out_dir: Optional[str] = None,
             model_dir: Optional[str] = None) -> dict:
    """Score either ``src``/``ref`` files or a split of a data config; write hypotheses and a JSON report."""
    if src:
        pairs = read_text_pair(Path(src), Path(ref))
        name = Path(src).stem
    else:
        data_cfg = load_data_config(translator.bundle.config.data, data_yaml)
        name = split or data_cfg.test_split
        pairs = load_split(data_cfg, name)
    start = time.perf_counter()
    hyps = [nbest[0].text for nbest in translator.translate([s for s, _ in pairs])]
    seconds = time.perf_counter() - start
    refs = [r for _, r in pairs]
    report = {"test_set": name, "sentences": len(pairs), "search": asdict(translator.search_cfg),
              "shortlist": translator.shortlist is not None,
              "bleu": bleu(hyps, refs).to_dict(), "chrf": chrf(hyps, refs).to_dict(),
              "seconds": round(seconds, 3), "sentences_per_second": round(len(pairs) / max(seconds, 1e-9), 2)}
    out = Path(out_dir) if out_dir else Path(model_dir or ".") / f"eval-{name}"
    atomic_write_bytes(out / "hypotheses.txt", "".join(h + "\n" for h in hyps).encode("utf-8"))
    report["report_path"] = str(out / "report.json")
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
    return report
