"""Model directories: round trip, atomic replacement, and clear errors for damaged ones."""
import pytest
import torch
import yaml

from seq2seq.checkpoint import ModelDirError, load_bundle, save_bundle
from seq2seq.corpus import generate_splits
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.tokenizer import train_tokenizers
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = tiny_config(model=dict(tie_embeddings=False))
    src_tok, tgt_tok = train_tokenizers(generate_splits(300, 5, 5)["train"], cfg.data.tokenizer)
    torch.manual_seed(0)
    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok)).eval()
    directory = tmp_path_factory.mktemp("bundle") / "model"
    save_bundle(directory, model, cfg, src_tok, tgt_tok)
    return directory, model, cfg, src_tok, tgt_tok


def test_round_trip_gives_the_same_model(saved):
    directory, model, cfg, src_tok, _ = saved
    bundle = load_bundle(directory)
    assert bundle.config == cfg
    src = torch.tensor([src_tok.encode(["The dog sees a cat."])[0]])
    tgt = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(src, torch.tensor([src.size(1)]), tgt),
                           bundle.model(src, torch.tensor([src.size(1)]), tgt))
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "model.safetensors", "spm.model"]


def test_rnn_weights_that_are_views_of_one_buffer_are_saved(tmp_path, saved):
    """cuDNN keeps a GRU's weights as views into one flat buffer on CUDA; saving must still work."""
    _, model, cfg, src_tok, tgt_tok = saved
    rnn = model.decoder.rnn
    flat = torch.cat([p.detach().flatten() for p in rnn.parameters()])
    offset = 0
    for param in rnn.parameters():
        param.data = flat[offset:offset + param.numel()].view_as(param)  # shares flat's storage
        offset += param.numel()
    save_bundle(tmp_path / "m", model, cfg, src_tok, tgt_tok)
    reloaded = load_bundle(tmp_path / "m").model
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_tied_weights_survive_safetensors(tmp_path):
    cfg = tiny_config(model=dict(tie_embeddings=True, share_embeddings=True))
    src_tok, tgt_tok = train_tokenizers(generate_splits(300, 5, 5)["train"], cfg.data.tokenizer)
    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok))
    save_bundle(tmp_path / "m", model, cfg, src_tok, tgt_tok)
    loaded = load_bundle(tmp_path / "m").model
    assert loaded.decoder.output.weight is loaded.decoder.embedding.weight
    assert torch.equal(loaded.decoder.embedding.weight, model.decoder.embedding.weight)


def test_saving_again_replaces_the_directory_whole(saved, tmp_path):
    directory, model, cfg, src_tok, tgt_tok = saved
    target = tmp_path / "model"
    save_bundle(target, model, cfg, src_tok, tgt_tok)
    save_bundle(target, model, cfg, src_tok, tgt_tok, extra={"step": 7})
    assert yaml.safe_load((target / "config.yaml").read_text())["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or backup left behind


def test_saving_again_keeps_the_shortlist_while_the_tokenizers_are_the_same(saved, tmp_path):
    _, model, cfg, src_tok, tgt_tok = saved
    target = tmp_path / "model"
    save_bundle(target, model, cfg, src_tok, tgt_tok)
    (target / "shortlist.safetensors").write_bytes(b"a shortlist")
    save_bundle(target, model, cfg, src_tok, tgt_tok, extra={"step": 7})  # training saves again
    assert (target / "shortlist.safetensors").read_bytes() == b"a shortlist"
    other, _ = train_tokenizers(generate_splits(200, 5, 5, seed=3)["train"], cfg.data.tokenizer)
    save_bundle(target, Seq2Seq(cfg.model, len(other), len(other)), cfg, other, other)  # new vocabularies
    assert not (target / "shortlist.safetensors").exists()


def test_saving_again_keeps_search_settings_and_other_files(saved, tmp_path):
    """tune --save writes search.yaml into a model directory; training that saves it again must not delete it."""
    _, model, cfg, src_tok, tgt_tok = saved
    target = tmp_path / "model"
    save_bundle(target, model, cfg, src_tok, tgt_tok)
    (target / "search.yaml").write_text("beam_size: 3\n")
    (target / "notes").mkdir()
    (target / "notes" / "README").write_text("trained on my data")
    (target / "latest").symlink_to("notes")  # a link stays a link
    (target / "config.yaml").write_text("stale")  # a file the save writes is written anew, not carried
    save_bundle(target, model, cfg, src_tok, tgt_tok, extra={"step": 7})
    assert (target / "search.yaml").read_text() == "beam_size: 3\n"
    assert (target / "notes" / "README").read_text() == "trained on my data"
    assert (target / "latest").is_symlink() and (target / "latest" / "README").is_file()
    assert yaml.safe_load((target / "config.yaml").read_text())["step"] == 7
    other, _ = train_tokenizers(generate_splits(200, 5, 5, seed=3)["train"], cfg.data.tokenizer)
    save_bundle(target, Seq2Seq(cfg.model, len(other), len(other)), cfg, other, other)  # new vocabularies
    assert (target / "search.yaml").exists()
    separate = Seq2Seq(cfg.model, len(src_tok), len(other))
    save_bundle(target, separate, cfg, src_tok, other)  # now two tokenizer files: the joint one is not carried
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml", "latest", "model.safetensors", "notes",
                                                        "search.yaml", "src.spm.model", "tgt.spm.model"]
    assert load_bundle(target).tgt_tokenizer is not load_bundle(target).src_tokenizer


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "damaged"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml: missing"),
    (lambda d: (d / "spm.model").write_bytes(b"garbage"), "not a valid sentencepiece model"),
    (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("format_version: 1",
                                                                                       "format_version: 99")),
     "format version 99"),
    (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("emb_size: 32",
                                                                                       "emb_size: 48")),
     "does not match config.yaml"),
])
def test_damaged_directory_is_one_clear_error(saved, tmp_path, damage, message):
    directory = copy_dir(saved[0], tmp_path / "model")
    damage(directory)
    with pytest.raises(ModelDirError) as err:
        load_bundle(directory)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="model directory not found"):
        load_bundle(tmp_path / "nope")
