"""The run manifest: what produced a model (versions, commit, seed, data hashes, score signatures)."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from seq2seq.config import Config
from seq2seq.data import resolve_source

PACKAGES = ("seq2seq", "torch", "sentencepiece", "sacrebleu", "hydra-core", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the seq2seq checkout in use (with '+dirty' for local changes), when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(cfg: Config) -> dict:
    data = cfg.data
    source = resolve_source(data)
    if source == "builtin":
        return {"source": "builtin", "builtin_size": data.builtin_size}
    if source == "hub":
        return {"source": "hub", "hub_name": data.hub_name, "hub_config": data.hub_config}
    root = Path(data.path)
    files = {}
    for split in (data.train_split, data.valid_split, data.test_split):
        names = [f"{split}.{data.src_lang}", f"{split}.{data.tgt_lang}"] if source == "text" else [f"{split}.{source}"]
        for name in names:
            if (root / name).is_file():
                files[name] = sha256(root / name)
    return {"source": source, "path": str(root.resolve()), "sha256": files}


def build_manifest(cfg: Config) -> dict:
    return {"versions": package_versions(), "git_commit": git_commit(), "seed": cfg.trainer.seed,
            "data": data_fingerprint(cfg), "platform": platform.platform()}
