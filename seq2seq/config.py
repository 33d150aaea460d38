"""Typed configuration: dataclasses mirrored by the Hydra YAML files in ``conf/``.

Hydra composes the YAML; :func:`to_config` checks it against these dataclasses (unknown keys and
wrong types fail there) and then :meth:`validate` checks values, so every bad option is one clear
line naming the option, before any data is read or any training starts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration option is missing, unknown or has an impossible value."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    cell: str = "gru"  # rnn | gru | lstm
    emb_size: int = 256
    enc_hidden_size: int = 256  # total over both directions when bidirectional
    enc_layers: int = 1
    bidirectional: bool = True
    dec_hidden_size: int = 256
    dec_layers: int = 1
    # none = Cho et al. 2014 context vector; bahdanau = additive attention on the previous state;
    # luong_dot / luong_general / luong_concat = attention after the RNN step (Luong et al. 2015; concat is
    # the additive score, as OpenNMT-py's "mlp" and Joey NMT's "bahdanau" decoders run it)
    attention: str = "bahdanau"
    input_feeding: bool = False  # feed the previous attentional (pre-output) vector to the RNN
    attention_size: int = 256  # hidden size of the additive attention MLP
    bridge: str = "learned"  # learned | copy | zeros: how encoder final states start the decoder
    dropout: float = 0.2  # between RNN layers and before the output layer
    emb_dropout: float = 0.2
    tie_embeddings: bool = False  # target embeddings = output projection
    share_embeddings: bool = False  # source embeddings = target embeddings (joint vocabulary)
    # pytorch = each layer's own default (embeddings N(0, 1)); uniform = every parameter U(-init_range,
    # init_range), as OpenNMT-py's param_init
    init: str = "pytorch"
    init_range: float = 0.1

    def validate(self) -> None:
        _check_choice("model.cell", self.cell, ("rnn", "gru", "lstm"))
        _check_choice("model.init", self.init, ("pytorch", "uniform"))
        if not self.init_range > 0:
            raise ConfigError(f"model.init_range={self.init_range} must be positive")
        _check_choice("model.attention", self.attention, ("none", "bahdanau", "luong_dot", "luong_general",
                                                               "luong_concat"))
        _check_choice("model.bridge", self.bridge, ("learned", "copy", "zeros"))
        for name in ("emb_size", "enc_hidden_size", "enc_layers", "dec_hidden_size", "dec_layers", "attention_size"):
            _check_positive(f"model.{name}", getattr(self, name))
        for name in ("dropout", "emb_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name}={value} must be in [0, 1)")
        if self.bidirectional and self.enc_hidden_size % 2:
            raise ConfigError(
                f"model.enc_hidden_size={self.enc_hidden_size} must be even for a bidirectional encoder "
                "(it is split between the two directions)"
            )
        if self.attention == "luong_dot" and self.enc_hidden_size != self.dec_hidden_size:
            raise ConfigError(
                "model.attention=luong_dot needs model.enc_hidden_size == model.dec_hidden_size "
                f"(got {self.enc_hidden_size} and {self.dec_hidden_size}); use luong_general otherwise"
            )
        if self.bridge == "copy" and self.enc_hidden_size != self.dec_hidden_size:
            raise ConfigError(
                "model.bridge=copy needs model.enc_hidden_size == model.dec_hidden_size "
                f"(got {self.enc_hidden_size} and {self.dec_hidden_size})"
            )
        if self.tie_embeddings and self.emb_size != self.dec_hidden_size:
            raise ConfigError(
                "model.tie_embeddings=true needs model.emb_size == model.dec_hidden_size "
                f"(got {self.emb_size} and {self.dec_hidden_size})"
            )


@dataclass
class TokenizerConfig:
    model_type: str = "unigram"  # unigram | bpe
    vocab_size: int = 8000
    joint: bool = True  # one vocabulary for both languages
    character_coverage: float = 1.0
    input_sentence_size: int = 1_000_000  # sentences sampled to train sentencepiece

    def validate(self) -> None:
        _check_choice("data.tokenizer.model_type", self.model_type, ("unigram", "bpe"))
        if self.vocab_size < 8:
            raise ConfigError(f"data.tokenizer.vocab_size={self.vocab_size} must be at least 8")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"data.tokenizer.character_coverage={self.character_coverage} must be in (0, 1]")


@dataclass
class DataConfig:
    # builtin = the generated corpus; text = {split}.{lang} files in `path`; tsv / jsonl = one file per
    # split in `path` ({split}.tsv / {split}.jsonl); hub = a Hugging Face dataset; auto = text when
    # `path` is an existing directory, else hub.
    source: str = "builtin"
    path: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    src_lang: str = "en"
    tgt_lang: str = "de"
    # column names; a dataset with a `translation` dict column uses the language keys instead
    src_column: Optional[str] = None
    tgt_column: Optional[str] = None
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    hub_split_map: dict[str, str] = field(default_factory=dict)  # local split name -> hub split name
    builtin_size: int = 12000  # training pairs of the built-in corpus
    max_len: int = 100  # training pairs longer than this (in pieces, either side) are dropped
    truncate_len: int = 200  # at translation time, source pieces beyond this are cut (with a warning)
    valid_max_sentences: int = 0  # 0 = the whole validation split in each validation
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        _check_choice("data.source", self.source, ("builtin", "text", "tsv", "jsonl", "hub", "auto"))
        if self.source in ("text", "tsv", "jsonl") and not self.path:
            raise ConfigError(f"data.source={self.source} needs data.path (a directory of split files)")
        if self.source == "hub" and not self.hub_name:
            raise ConfigError("data.source=hub needs data.hub_name (for example bentrevett/multi30k)")
        if self.source == "auto" and not (self.path or self.hub_name):
            raise ConfigError("data.source=auto needs data.path or data.hub_name")
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"data.src_lang and data.tgt_lang are both {self.src_lang!r}")
        _check_positive("data.max_len", self.max_len)
        _check_positive("data.truncate_len", self.truncate_len)
        _check_positive("data.builtin_size", self.builtin_size)
        self.tokenizer.validate()


@dataclass
class SearchConfig:
    beam_size: int = 1  # 1 = greedy
    alpha: float = 0.0  # GNMT length penalty; 0 = raw log-probability
    length_penalty: str = "gnmt"  # gnmt (uses alpha) | average (score / length)
    # beam search: when a sentence stops. bound: once no live hypothesis can beat the n-th best finished one
    # (exact); early: once its best extension at a step ends in EOS (as OpenNMT-py, Joey NMT: fewer steps)
    stopping: str = "bound"
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10
    batch_size: int = 64  # sentences per decoding batch
    min_len: int = 0  # EOS is forbidden until this many tokens have been generated
    no_repeat_ngram: int = 0  # n > 0: no n-gram of generated tokens may occur twice in one output
    forbid_unk: bool = False  # never generate the unknown-word token

    def validate(self) -> None:
        _check_positive("search.beam_size", self.beam_size)
        _check_choice("search.length_penalty", self.length_penalty, ("gnmt", "average"))
        _check_choice("search.stopping", self.stopping, ("bound", "early"))
        _check_positive("search.min_len", self.min_len, allow_zero=True)
        _check_positive("search.no_repeat_ngram", self.no_repeat_ngram, allow_zero=True)
        _check_positive("search.batch_size", self.batch_size)
        _check_positive("search.alpha", self.alpha, allow_zero=True)
        _check_positive("search.max_len_a", self.max_len_a, allow_zero=True)
        _check_positive("search.max_len_b", self.max_len_b, allow_zero=True)
        if self.max_len_a == 0 and self.max_len_b == 0:
            raise ConfigError("search.max_len_a and search.max_len_b are both 0: no output could be produced")


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 | bf16 | fp16: matrix products in 16 bits, the rest float32. On CUDA autocast of the forward pass;
    # fp16 needs CUDA and uses a gradient scaler. bf16 on the CPU (fast with AMX or AVX512-BF16): the
    # decoder's products and output layer only, with no autocast (step.use_precision).
    precision: str = "fp32"
    compile: bool = False  # torch.compile the decoder step (attention, RNN cell); bf16 on the CPU stays eager
    seed: int = 42
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "none"  # none | plateau | warmup
    warmup_steps: int = 1000  # warmup: linear to lr, then inverse square root
    plateau_factor: float = 0.5  # plateau: lr *= factor when validation BLEU stops rising
    plateau_patience: int = 2
    min_lr: float = 1e-6
    batch_tokens: int = 4000  # target tokens per batch (per rank), padding included (sentences x longest target + 1)
    batch_multiple: int = 8  # a full batch holds a multiple of this many sentences (fewer tensor shapes)
    accumulate: int = 1  # batches per optimizer step (gradient accumulation): accumulate x batch_tokens a step
    max_steps: int = 0  # 0 = no step limit
    max_epochs: int = 10
    max_minutes: float = 0.0  # wall-clock budget for training; 0 = none
    clip_grad_norm: float = 5.0  # 0 = no clipping
    label_smoothing: float = 0.0
    teacher_forcing: float = 1.0  # probability of feeding the reference token at each step
    valid_every: int = 500  # steps between validations
    patience: int = 0  # validations without BLEU improvement before stopping; 0 = never stop early
    log_every: int = 50
    resume: bool = False  # continue from the run directory's checkpoint
    checkpoint_every: int = 0  # steps between resume checkpoints besides validations; 0 = at validations only
    max_bad_steps: int = 5  # stop after this many NaN/inf batches in a row
    keep_checkpoints: int = 5  # weights kept in checkpoints/ after each validation: the last N and the best N
    test_after: bool = True  # translate and score the test split with the best model at the end
    # torchrun: minutes a rank waits for the others in a collective (rank 0 validating and saving) before failing
    rank_timeout_minutes: float = 60.0

    def validate(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"trainer.device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _check_choice("trainer.optimizer", self.optimizer, ("adam", "adamw"))
        _check_choice("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_choice("trainer.scheduler", self.scheduler, ("none", "plateau", "warmup"))
        _check_positive("trainer.lr", self.lr)
        _check_positive("trainer.batch_tokens", self.batch_tokens)
        _check_positive("trainer.batch_multiple", self.batch_multiple)
        _check_positive("trainer.accumulate", self.accumulate)
        _check_positive("trainer.valid_every", self.valid_every)
        _check_positive("trainer.log_every", self.log_every)
        _check_positive("trainer.max_bad_steps", self.max_bad_steps)
        _check_positive("trainer.rank_timeout_minutes", self.rank_timeout_minutes)
        for name in ("max_steps", "max_epochs", "max_minutes", "clip_grad_norm", "patience", "weight_decay",
                     "warmup_steps", "threads", "keep_checkpoints", "checkpoint_every"):
            _check_positive(f"trainer.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"trainer.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.teacher_forcing <= 1.0:
            raise ConfigError(f"trainer.teacher_forcing={self.teacher_forcing} must be in [0, 1]")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"trainer.plateau_factor={self.plateau_factor} must be in (0, 1)")
        if self.max_steps == 0 and self.max_epochs == 0 and self.max_minutes == 0:
            raise ConfigError("set at least one of trainer.max_steps, trainer.max_epochs, trainer.max_minutes")


@dataclass
class Config:
    """The whole training configuration, as composed by ``conf/train.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    name: str = "seq2seq"

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.trainer.validate()
        self.search.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def to_config(cfg: DictConfig | dict) -> Config:
    """Check a composed config against the dataclasses and return the typed, validated form."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise ConfigError(f"bad option {key}: {message}" if key else f"bad configuration: {message}") from None
    return config.validate()


def merge_into(base, values, source: str):
    """A copy of the config dataclass ``base`` with the mapping ``values`` merged in, type-checked and
    validated; a bad key or value is a ConfigError naming ``source``."""
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), values))
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{source}: {first}") from None
    merged.validate()
    return merged


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (used when loading a model directory)."""
    return to_config(OmegaConf.create(values))
