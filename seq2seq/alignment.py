"""Attention output of translations: JSON lines and heatmaps.

Each record is ``{"index", "src_pieces", "tgt_pieces", "attention"}``: ``attention`` has one row per
target piece, plus one for EOS when the translation ended with it (``tgt_pieces`` then ends with
``</s>``, so rows == len(tgt_pieces)), and one column per source piece; values rounded to 4 decimals.
Empty input lines give a record with empty lists, so line i of the JSON file is input line i.

Heatmaps need matplotlib (``pip install seq2seq[plot]``); it is imported only when one is drawn,
with the non-interactive Agg canvas.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Optional

from torch import nn

from seq2seq.translate import Translation

EOS_PIECE = "</s>"


class AlignmentError(ValueError):
    """Attention cannot be written: the model has none, or matplotlib is missing."""


def model_has_attention(model: nn.Module) -> bool:
    """A Seq2Seq (or an Ensemble of them) whose steps return attention weights."""
    if hasattr(model, "has_attention"):
        return bool(model.has_attention)
    return model.cfg.attention != "none"


def alignment_record(index: int, translation: Translation) -> dict:
    """The JSON record of one translation (see the module docstring)."""
    attention = translation.attention  # [rows, len(src_pieces)] or None
    rows = [] if attention is None else [[round(float(v), 4) for v in row] for row in attention.tolist()]
    tgt_pieces = list(translation.pieces)
    if len(rows) == len(tgt_pieces) + 1:
        tgt_pieces.append(EOS_PIECE)
    return {"index": index, "src_pieces": list(translation.src_pieces), "tgt_pieces": tgt_pieces,
            "attention": rows}


def _figure_class():
    try:
        from matplotlib.figure import Figure  # the Agg canvas: no display, no global backend state
    except ImportError:
        raise AlignmentError("drawing attention needs matplotlib: pip install seq2seq[plot] "
                             "(or pip install matplotlib)") from None
    return Figure


def save_heatmap(path: str | Path, record: dict) -> None:
    """Draw a record's attention: source pieces on the x axis, target pieces on the y axis."""
    Figure = _figure_class()
    src, tgt, weights = record["src_pieces"], record["tgt_pieces"], record["attention"]
    fig = Figure(figsize=(max(3.0, 0.35 * len(src) + 1.5), max(2.5, 0.35 * len(tgt) + 1.0)))
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(src)), labels=src, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt)), labels=tgt, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100, format="png")


class AttentionWriter:
    """Writes the attention of translations to a JSON lines file and/or a directory of PNG heatmaps."""

    def __init__(self, json_path: Optional[str] = None, png_dir: Optional[str] = None):
        self.json_path, self.png_dir = json_path, Path(png_dir) if png_dir else None
        self._file: Optional[IO[str]] = None

    @classmethod
    def open(cls, model: nn.Module, json_path: Optional[str], png_dir: Optional[str]) -> "AttentionWriter":
        """Check that the model attends (and that matplotlib is there for PNGs) before any work is done."""
        if (json_path or png_dir) and not model_has_attention(model):
            raise AlignmentError("--attention-json / --attention-png need a model with attention; this one was "
                                 "trained with model.attention=none")
        if png_dir:
            _figure_class()
        return cls(json_path, png_dir)

    @property
    def active(self) -> bool:
        return bool(self.json_path or self.png_dir)

    def __enter__(self) -> "AttentionWriter":
        if self.json_path:
            self._file = open(self.json_path, "w", encoding="utf-8", newline="\n")
        if self.png_dir:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def add(self, index: int, translation: Translation) -> None:
        """Record one input line (index counts from 0); PNGs are skipped for empty lines."""
        if not self.active:
            return
        record = alignment_record(index, translation)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.png_dir is not None and record["attention"]:
            save_heatmap(self.png_dir / f"{index}.png", record)
