"""Data loading: the built-in corpus, local files, and clear errors for bad files."""
import json

import pytest

from seq2seq.config import DataConfig, TokenizerConfig
from seq2seq.corpus import generate_splits
from seq2seq.data import DataError, load_split, read_text_pair
from seq2seq.tokenizer import Tokenizer, train_tokenizers
from tests.conftest import MULTI30K


def test_builtin_corpus_is_deterministic_and_held_out():
    a, b = generate_splits(500, 50, 50), generate_splits(500, 50, 50)
    assert a == b
    train_src = {s for s, _ in a["train"]}
    assert not train_src & {s for s, _ in a["valid"] + a["test"]}
    lengths = [len(t.split()) for _, t in a["train"]]
    assert min(lengths) <= 6 and max(lengths) >= 20  # variable length


def test_builtin_corpus_has_agreement_and_reordering():
    pairs = generate_splits(3000, 10, 10)["train"]
    future = [(s, t) for s, t in pairs if " will " in s and "," not in s and " and " not in s]
    assert future and all(t.split()[-1].rstrip(".") not in ("wird", "werden") for _, t in future)
    assert any(t.startswith("Den ") or " den " in t for _, t in pairs)  # masculine accusative


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def text_cfg(tmp_path, **kw):
    return DataConfig(source="text", path=str(tmp_path), src_lang="de", tgt_lang="en", **kw)


def test_text_pairs_load(tmp_path):
    write(tmp_path / "train.de", "Ein Hund.\nZwei Katzen.\n".encode())
    write(tmp_path / "train.en", b"A dog.\nTwo cats.\n")
    assert load_split(text_cfg(tmp_path), "train") == [("Ein Hund.", "A dog."), ("Zwei Katzen.", "Two cats.")]


@pytest.mark.parametrize("src,tgt,message", [
    (b"a\nb\nc\n", b"x\ny\n", "train.de has 3 lines but"),
    (b"", b"x\n", "train.de: file is empty"),
    (b"ok\n\xff\xfe bad\n", b"x\ny\n", "train.de:2: invalid UTF-8"),
])
def test_bad_text_files_name_the_file_and_line(tmp_path, src, tgt, message):
    write(tmp_path / "train.de", src)
    write(tmp_path / "train.en", tgt)
    with pytest.raises(DataError) as err:
        load_split(text_cfg(tmp_path), "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train.de: file not found"):
        read_text_pair(tmp_path / "train.de", tmp_path / "train.en")


def test_tsv_and_jsonl(tmp_path):
    write(tmp_path / "train.tsv", "de\ten\nEin Hund.\tA dog.\n".encode())
    assert load_split(DataConfig(source="tsv", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train") == [
        ("Ein Hund.", "A dog.")]
    lines = [json.dumps({"translation": {"de": "Ein Hund.", "en": "A dog."}}), json.dumps({"de": "Ja.", "en": "Yes."})]
    write(tmp_path / "train.jsonl", ("\n".join(lines) + "\n").encode())
    assert load_split(DataConfig(source="jsonl", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train") == [
        ("Ein Hund.", "A dog."), ("Ja.", "Yes.")]


def test_unknown_column_is_named(tmp_path):
    write(tmp_path / "train.tsv", "german\tenglish\nEin Hund.\tA dog.\n".encode())
    with pytest.raises(DataError, match=r"train.tsv:2: unknown column 'de'; available: german, english"):
        load_split(DataConfig(source="tsv", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train")
    write(tmp_path / "train.jsonl", b'{"de": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: unknown column 'en'"):
        load_split(DataConfig(source="jsonl", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train")


def test_bad_tsv_row_and_json_line(tmp_path):
    write(tmp_path / "train.tsv", "de\ten\na\tb\tc\n".encode())
    with pytest.raises(DataError, match="train.tsv:2: 3 tab-separated fields"):
        load_split(DataConfig(source="tsv", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train")
    write(tmp_path / "train.jsonl", b'{"de": "a", "en": "b"}\n{broken\n')
    with pytest.raises(DataError, match="train.jsonl:2: invalid JSON"):
        load_split(DataConfig(source="jsonl", path=str(tmp_path), src_lang="de", tgt_lang="en"), "train")


def test_tokenizer_round_trip_and_special_ids():
    pairs = generate_splits(400, 10, 10)["train"]
    for model_type, joint in (("unigram", True), ("bpe", False)):
        src_tok, tgt_tok = train_tokenizers(pairs, TokenizerConfig(model_type=model_type, vocab_size=150, joint=joint))
        assert (src_tok is tgt_tok) == joint
        for src, tgt in pairs[:50]:
            assert src_tok.decode(src_tok.encode([src]))[0] == src
            assert tgt_tok.decode(tgt_tok.encode([tgt]))[0] == tgt
        assert tgt_tok.id_to_piece([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
        assert Tokenizer(tgt_tok.model_proto).encode(["Der Hund."]) == tgt_tok.encode(["Der Hund."])


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="Multi30k not available")
def test_multi30k_loads_from_the_shared_folder():
    cfg = DataConfig(source="auto", path=str(MULTI30K), hub_name="bentrevett/multi30k", src_lang="de", tgt_lang="en")
    train, test = load_split(cfg, "train"), load_split(cfg, "test2016")
    assert (len(train), len(test)) == (29000, 1000)
    assert train[0] == ("Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
                        "Two young, White males are outside near many bushes.")


def test_hub_loading_maps_splits_and_reads_translation_dicts(monkeypatch):
    """The hub path, with datasets.load_dataset replaced by an in-memory dataset (no network here)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        rows = {"translation": [{"de": "Ein Hund.", "en": "A dog."}, {"de": "Ja.", "en": "Yes."}]}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hub", hub_name="wmt14", hub_config="de-en", src_lang="de", tgt_lang="en",
                     hub_split_map={"test2016": "test"})
    assert load_split(cfg, "test2016") == [("Ein Hund.", "A dog."), ("Ja.", "Yes.")]
    assert calls == [("wmt14", "de-en", "test")]
    bad = DataConfig(source="hub", hub_name="wmt14", src_lang="de", tgt_lang="fr")
    with pytest.raises(DataError, match=r"hub dataset wmt14 \(train\) row 0: unknown column 'fr'"):
        load_split(bad, "train")


def test_unreachable_hub_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'bentrevett/multi30k' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(source="hub", hub_name="bentrevett/multi30k", src_lang="de", tgt_lang="en")
    with pytest.raises(DataError) as err:
        load_split(cfg, "train")
    assert str(err.value).startswith("hub dataset 'bentrevett/multi30k' split 'train' could not be loaded: Couldn't")
    assert "\n" not in str(err.value)
