"""The self-contained model directory, and atomic writes.

A model directory holds everything translate and evaluate need, and nothing that runs code when read:
    model.safetensors   the weights
    config.yaml         the resolved training configuration and the format version
    spm.model           the joint sentencepiece model (or src.spm.model + tgt.spm.model)
    shortlist.safetensors  optional: the lexical shortlist (seq2seq/shortlist.py); built from the data and
                        the tokenizers, so saving the directory again keeps it while the tokenizers are the same
    search.yaml         optional: default search settings (seq2seq-tune --save)
Saving a directory again keeps whatever else it holds (search.yaml, a user's notes).
It is written to a temporary directory beside its final place and renamed, so a crash mid-write
leaves the previous version whole.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from seq2seq.config import Config, ConfigError, config_from_dict
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.tokenizer import Tokenizer, TokenizerError

FORMAT_VERSION = 1
SHORTLIST_FILE = "shortlist.safetensors"
TOKENIZER_FILES = ("spm.model", "src.spm.model", "tgt.spm.model")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete, damaged or from an incompatible version."""


@dataclass
class Bundle:
    model: Seq2Seq
    config: Config
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer


def _atomic_write(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, flush it to disk, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file (read back with ``torch.load(..., weights_only=True)``)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """The model's weights as safetensors: CPU copies, each tensor once (tied weights under their first name).

    Not ``safetensors.torch.save_model``: on CUDA, cuDNN keeps a GRU / LSTM's weights as views into one
    flat buffer, which it refuses to save. ``load_model`` reads the file back, tied weights included.
    """
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path))


def save_bundle(directory: str | Path, model: Seq2Seq, config: Config, src_tok: Tokenizer, tgt_tok: Tokenizer,
                extra: dict | None = None) -> Path:
    """Write a model directory atomically: a complete new version, or the old one untouched."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        save_weights(model, staging / "model.safetensors")
        meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), **(extra or {})}
        (staging / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
        if src_tok is tgt_tok:
            src_tok.save(staging / "spm.model")
        else:
            src_tok.save(staging / "src.spm.model")
            tgt_tok.save(staging / "tgt.spm.model")
        if directory.is_dir():
            _carry_over(directory, staging)
        for f in staging.rglob("*"):  # make the files durable before the rename publishes them
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` what the old directory holds beside the files a save writes: tune's search.yaml, a
    user's notes, anything else (so saving again never deletes them). The shortlist only while the tokenizers
    are byte-identical: it is built from them, and a new vocabulary would make it wrong."""
    same_tokenizers = _same_tokenizers(old, new)
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name in TOKENIZER_FILES:
            continue
        if entry.name == SHORTLIST_FILE and not same_tokenizers:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _same_tokenizers(old: Path, new: Path) -> bool:
    """Whether two model directories hold byte-identical tokenizer files."""
    for name in TOKENIZER_FILES:
        if (old / name).is_file() != (new / name).is_file():
            return False
        if (new / name).is_file() and (old / name).read_bytes() != (new / name).read_bytes():
            return False
    return True


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: model directory not found")
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise ModelDirError(f"{config_file}: missing; is {directory} a model directory written by seq2seq?")
    try:
        meta = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{config_file}: unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ModelDirError(f"{config_file}: not a seq2seq model configuration")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{config_file}: format version {meta.get('format_version')!r}, this seq2seq reads "
                            f"version {FORMAT_VERSION}")
    return meta


def load_tokenizers(directory: Path) -> tuple[Tokenizer, Tokenizer]:
    try:
        if (directory / "spm.model").is_file():
            joint = Tokenizer.load(directory / "spm.model")
            return joint, joint
        return Tokenizer.load(directory / "src.spm.model"), Tokenizer.load(directory / "tgt.spm.model")
    except TokenizerError as err:
        raise ModelDirError(str(err)) from None


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a model directory for inference (eval mode). Reads no pickle."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as err:
        raise ModelDirError(f"{directory / 'config.yaml'}: {err}") from None
    src_tok, tgt_tok = load_tokenizers(directory)
    model = Seq2Seq(config.model, len(src_tok), len(tgt_tok))
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelDirError(f"{weights}: missing")
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelDirError(f"{weights}: damaged or does not match config.yaml ({first[:200]})") from None
    model.to(device).eval()
    return Bundle(model, config, src_tok, tgt_tok)
