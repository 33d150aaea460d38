"""Parallel data: the built-in corpus, local files (text pairs, TSV, JSONL) and Hugging Face datasets.

Every loader returns a list of (source, target) strings. Bad files fail with one line naming the
file and line: a missing or empty file, sides of different length, undecodable UTF-8, a missing
column.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from seq2seq.config import DataConfig

log = logging.getLogger(__name__)
Pairs = list[tuple[str, str]]


class DataError(ValueError):
    """A data file or dataset cannot be used; the message names the file and line."""


def read_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 text file without their line ends; a clear error for bad files."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{number}: invalid UTF-8 at byte {err.start} of the line") from None
    return out


def read_text_pair(src_path: Path, tgt_path: Path) -> Pairs:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                        "the sides must be line-aligned")
    return list(zip(src, tgt))


def _columns(record: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    """The (source, target) strings of one record: named columns, or a `translation` dict."""
    src_key, tgt_key = cfg.src_column or cfg.src_lang, cfg.tgt_column or cfg.tgt_lang
    if src_key not in record and "translation" in record and isinstance(record["translation"], dict):
        record = record["translation"]
    for key in (src_key, tgt_key):
        if key not in record:
            raise DataError(f"{where}: unknown column {key!r}; available: {', '.join(map(str, record))}")
    src, tgt = record[src_key], record[tgt_key]
    if not isinstance(src, str) or not isinstance(tgt, str):
        raise DataError(f"{where}: columns {src_key!r} and {tgt_key!r} must hold strings")
    return src, tgt


def read_tsv(path: Path, cfg: DataConfig) -> Pairs:
    """A TSV file whose first line names the columns."""
    lines = read_lines(path)
    header = lines[0].split("\t")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}")
        pairs.append(_columns(dict(zip(header, fields)), cfg, f"{path}:{number}"))
    return pairs


def read_jsonl(path: Path, cfg: DataConfig) -> Pairs:
    pairs = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        pairs.append(_columns(record, cfg, f"{path}:{number}"))
    return pairs


def load_hub(cfg: DataConfig, split: str) -> Pairs:
    """A split of a Hugging Face hub dataset (needs the internet or a local datasets cache)."""
    import datasets  # imported here: slow to import and only needed for hub data

    split = cfg.hub_split_map.get(split, split)
    try:
        dataset = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split)
    except Exception as err:  # network, missing dataset, bad split: all surface as one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"hub dataset {cfg.hub_name!r} split {split!r} could not be loaded: {first_line}") from None
    where = f"hub dataset {cfg.hub_name} ({split})"
    return [_columns(record, cfg, f"{where} row {i}") for i, record in enumerate(dataset)]


def resolve_source(cfg: DataConfig) -> str:
    if cfg.source != "auto":
        return cfg.source
    if cfg.path and Path(cfg.path).is_dir():
        return "text"
    if cfg.hub_name:
        log.info("data.path %s is not a directory: loading %s from the hub", cfg.path, cfg.hub_name)
        return "hub"
    raise DataError(f"data.path={cfg.path}: directory not found and no data.hub_name to fall back on")


def load_split(cfg: DataConfig, split: str) -> Pairs:
    """Load the split named ``split`` (for example ``cfg.train_split``) as (source, target) pairs."""
    source = resolve_source(cfg)
    if source == "builtin":
        from seq2seq.corpus import generate_splits

        splits = generate_splits(train_size=cfg.builtin_size)
        if split not in splits:
            raise DataError(f"the built-in corpus has splits train, valid, test, not {split!r}")
        return splits[split]
    if source == "hub":
        return load_hub(cfg, split)
    root = Path(cfg.path)
    if source == "text":
        return read_text_pair(root / f"{split}.{cfg.src_lang}", root / f"{split}.{cfg.tgt_lang}")
    if source == "tsv":
        return read_tsv(root / f"{split}.tsv", cfg)
    return read_jsonl(root / f"{split}.jsonl", cfg)


def filter_by_length(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int) -> list[int]:
    """Indices of pairs whose sides are both non-empty and at most ``max_len`` pieces."""
    return [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if 0 < len(s) <= max_len and 0 < len(t) <= max_len]
