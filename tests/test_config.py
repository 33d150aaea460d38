"""Config composition of every group option, and clear errors for bad options."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from seq2seq.config import ConfigError, to_config

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "trainer", "search", "experiment"])
def test_every_option_of_every_group_composes_and_validates(group):
    assert options(group), f"conf/{group}/ has no options"
    for option in options(group):
        overrides = [f"experiment={option}"] if group == "experiment" else [f"{group}={option}"]
        config = to_config(compose_train(overrides))
        assert config.model.cell in ("rnn", "gru", "lstm")


def test_defaults_are_the_builtin_corpus_and_a_bahdanau_gru():
    config = to_config(compose_train())
    assert config.data.source == "builtin"
    assert (config.model.cell, config.model.attention, config.model.bidirectional) == ("gru", "bahdanau", True)


def test_command_line_overrides_reach_the_typed_config():
    config = to_config(compose_train(["model.cell=lstm", "trainer.lr=0.01", "model=gru_cho", "search.beam_size=4"]))
    assert (config.model.cell, config.model.attention, config.trainer.lr, config.search.beam_size) == (
        "lstm", "none", 0.01, 4)


@pytest.mark.parametrize("override,message", [
    ("model.cell=transformer", "model.cell='transformer' is not one of"),
    ("model.enc_hidden_size=255", "must be even for a bidirectional encoder"),
    ("search.beam_size=-1", "search.beam_size=-1 must be > 0"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("model.enc_hidden_size=abc", "model.enc_hidden_size"),
    ("+model.colour=blue", "model.colour"),
    ("trainer.teacher_forcing=2", "trainer.teacher_forcing=2.0 must be in [0, 1]"),
    ("model.attention=luong_dot model.enc_hidden_size=128", "luong_dot needs"),
])
def test_bad_options_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        to_config(compose_train(override.split()))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_data_config_file_merges_over_the_model_s_and_names_itself_on_error(tmp_path):
    from seq2seq.config import DataConfig
    from seq2seq.evaluate import load_data_config

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("defaults: [builtin]\nbuiltin_size: 300\ntokenizer:\n  vocab_size: 99\n")
    bad.write_text("builtn_size: 300\n")
    merged = load_data_config(DataConfig(src_lang="de", tgt_lang="en"), str(good))
    assert (merged.builtin_size, merged.tokenizer.vocab_size, merged.src_lang) == (300, 99, "de")
    with pytest.raises(ConfigError, match=r"bad.yaml: Key 'builtn_size' not in 'DataConfig'"):
        load_data_config(DataConfig(), str(bad))
