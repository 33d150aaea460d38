"""Decoding tools: ensembles, checkpoint averaging, forced scoring, attention output and dev-set tuning.

One tiny model is trained in-process (a few steps: these tests check mechanics, not quality); a second
model with the same vocabularies is made from an earlier checkpoint of the same run.
"""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, load_model

from seq2seq import tune as tune_module
from seq2seq.average import average_checkpoints
from seq2seq.average import main as average_main
from seq2seq.batch import make_batch
from seq2seq.checkpoint import ModelDirError, load_bundle, save_bundle
from seq2seq.cli import evaluate_main, translate_main
from seq2seq.config import SearchConfig, TokenizerConfig
from seq2seq.data import load_split
from seq2seq.ensemble import Ensemble, load_ensemble
from seq2seq.metrics import Score
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.scoring import main as score_main
from seq2seq.scoring import token_log_probs
from seq2seq.search import max_lengths, search
from seq2seq.shortlist import main as shortlist_main
from seq2seq.tokenizer import BOS_ID, EOS_ID, train_tokenizer
from seq2seq.train import train
from seq2seq.translate import Translator
from seq2seq.tune import save_search_config, tune
from tests.conftest import tiny_config

SOURCES = ["The dog sees a cat.", "Two old men will buy the red car in the park.", "A woman.", "The red car."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny training run: validations (and checkpoints) at steps 3 and 6."""
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3.safetensors", "step-6.safetensors"]
    return run


@pytest.fixture(scope="module")
def model_dir(run_dir):
    return run_dir / "model"


@pytest.fixture(scope="module")
def other_dir(run_dir, tmp_path_factory):
    """A second model with the same vocabularies: the weights of step 3."""
    bundle = load_bundle(run_dir / "model")
    load_model(bundle.model, str(run_dir / "checkpoints" / "step-3.safetensors"))
    return save_bundle(tmp_path_factory.mktemp("other") / "model", bundle.model, bundle.config,
                       bundle.src_tokenizer, bundle.tgt_tokenizer)


def make_model_dir(model_dir, directory, tokenizer=None, **model_overrides):
    """An untrained model directory like ``model_dir``, with another tokenizer or model options."""
    bundle = load_bundle(model_dir)
    tok = tokenizer or bundle.tgt_tokenizer
    config = replace(bundle.config, model=replace(bundle.config.model, **model_overrides))
    return save_bundle(directory, Seq2Seq(config.model, len(tok), len(tok)), config, tok, tok)


def encode(bundle, lines=SOURCES):
    return bundle.src_tokenizer.encode(lines)


# --- ensembles ---------------------------------------------------------------------------------
@pytest.mark.parametrize("beam", [1, 3])
def test_ensemble_of_one_equals_the_model(model_dir, beam):
    bundle = load_bundle(model_dir)
    batch = make_batch(encode(bundle))
    cfg = SearchConfig(beam_size=beam, alpha=0.6)
    alone = search(bundle.model, batch.src, batch.src_len, cfg, n_best=beam, return_attention=True)
    ensemble = search(Ensemble([bundle.model]), batch.src, batch.src_len, cfg, n_best=beam, return_attention=True)
    for hyps_a, hyps_e in zip(alone, ensemble):
        assert [h.tokens for h in hyps_a] == [h.tokens for h in hyps_e]
        for a, e in zip(hyps_a, hyps_e):
            assert a.score == pytest.approx(e.score, abs=1e-4)
            assert torch.allclose(a.attention, e.attention, atol=1e-6)


def test_ensemble_step_averages_the_probabilities(model_dir, other_dir):
    m1, m2 = load_bundle(model_dir).model, load_bundle(other_dir).model
    batch = make_batch(encode(load_bundle(model_dir)))
    ensemble = Ensemble([m1, m2])
    prev = torch.full((batch.src.size(0),), BOS_ID)
    with torch.no_grad():
        enc = ensemble.encode(batch.src, batch.src_len)
        log_probs, state, attn = ensemble.step(prev, ensemble.init_state(enc), enc)  # [B, V], [B, S]
        outs = [m.step(prev, m.init_state(m.encode(batch.src, batch.src_len)), m.encode(batch.src, batch.src_len))
                for m in (m1, m2)]
    expected = (outs[0][0].softmax(-1) + outs[1][0].softmax(-1)) / 2
    assert not torch.allclose(outs[0][0].softmax(-1), outs[1][0].softmax(-1), atol=1e-4)  # really two models
    assert torch.allclose(log_probs.exp(), expected, atol=1e-6)
    assert torch.allclose(torch.log_softmax(log_probs, -1), log_probs, atol=1e-6)  # search's log_softmax: no-op
    assert torch.allclose(attn, (outs[0][2] + outs[1][2]) / 2, atol=1e-6)
    selected = state.select(torch.tensor([1, 0]))
    assert torch.equal(selected.parts[1].hidden[:, 0], state.parts[1].hidden[:, 1])


def test_ensemble_translates_from_the_command_line(model_dir, other_dir, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(SOURCES) + "\n")
    translate_main(["--model", str(model_dir), str(other_dir), "--beam", "2", "--device", "cpu",
                    "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")])
    assert len((tmp_path / "out.txt").read_text().split("\n")) == len(SOURCES) + 1
    translator = Translator.from_dirs([model_dir, other_dir], device="cpu", beam_size=2)
    assert isinstance(translator.model, Ensemble) and translator.search_cfg.beam_size == 2
    assert not isinstance(Translator.from_dirs([model_dir], device="cpu").model, Ensemble)


def test_translate_workers_write_what_one_worker_writes(model_dir, other_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(SOURCES * 3) + "\n")
    for workers in ("1", "2"):  # an ensemble, each batch of one sentence on its own
        translate_main(["--model", str(model_dir), str(other_dir), "--beam", "2", "--device", "cpu", "--batch-size",
                        "1", "--workers", workers, "--n-best", "2", "--input", str(tmp_path / "in.txt"),
                        "--output", str(tmp_path / f"out{workers}.txt")])
    assert (tmp_path / "out2.txt").read_text() == (tmp_path / "out1.txt").read_text()
    assert len((tmp_path / "out1.txt").read_text().splitlines()) == 2 * len(SOURCES) * 3
    with pytest.raises(SystemExit):
        translate_main(["--model", str(model_dir), "--workers", "0"])
    assert "error: --workers must be at least 1, got 0" in capsys.readouterr().err


def test_shortlist_is_built_and_used_from_the_command_line(model_dir, tmp_path, capsys, monkeypatch):
    from seq2seq import shortlist as shortlist_module

    model = shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "in.txt").write_text("\n".join(SOURCES) + "\n\n")
    args = ["--model", str(model), "--beam", "2", "--device", "cpu", "--input", str(tmp_path / "in.txt")]
    with pytest.raises(SystemExit):
        translate_main([*args, "--shortlist"])
    assert f"error: {model / 'shortlist.safetensors'}: no shortlist; build one with" in capsys.readouterr().err
    shortlist_module.main(["--model", str(model)])  # from the model's training split (the built-in corpus)
    assert "shortlist.safetensors" in capsys.readouterr().out
    # each sentence keeps to its own shortlist: the same translations one by one as in one batch
    for name, extra in (("batch", []), ("alone", ["--batch-size", "1"])):
        translate_main([*args, *extra, "--shortlist", "--output", str(tmp_path / f"{name}.txt")])
    assert (tmp_path / "alone.txt").read_text() == (tmp_path / "batch.txt").read_text()
    assert len((tmp_path / "batch.txt").read_text().split("\n")) == len(SOURCES) + 2
    # a real cut: the target vocabulary of each batch shrinks, and every line still gets its one output line
    monkeypatch.setattr(shortlist_module, "SUBSET_MULTIPLE", 8)
    bundle = load_bundle(model)
    shortlist = shortlist_module.Shortlist.load(model / "shortlist.safetensors", len(bundle.src_tokenizer),
                                               len(bundle.tgt_tokenizer))
    vocab = shortlist.for_batch(torch.tensor(encode(bundle)[0]))[0]
    assert vocab.numel() < len(bundle.tgt_tokenizer)
    translator = Translator.from_dir(model, device="cpu", beam_size=2, shortlist=True)
    for hyps, line in zip(translator.translate(SOURCES + [""]), SOURCES + [""]):
        assert len(hyps) == 1 and (hyps[0].text or not line)
    evaluate_main(["--model", str(model), "--device", "cpu", "--shortlist", "--src", str(tmp_path / "in.txt"),
                   "--ref", str(tmp_path / "in.txt"), "--out", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["shortlist"] is True
    with pytest.raises(SystemExit):
        shortlist_module.main(["--model", str(model), "--src", str(tmp_path / "in.txt")])
    assert "error: give both --src and --tgt" in capsys.readouterr().err


def test_ensemble_needs_the_same_vocabularies(model_dir, tmp_path):
    other_tok = train_tokenizer(SOURCES * 20, TokenizerConfig(vocab_size=40))
    foreign = make_model_dir(model_dir, tmp_path / "foreign", tokenizer=other_tok)
    with pytest.raises(ModelDirError) as err:
        load_ensemble([model_dir, foreign])
    message = str(err.value)
    assert str(model_dir) in message and str(foreign) in message and "vocabular" in message
    assert "\n" not in message


# --- checkpoint averaging ------------------------------------------------------------------------
def test_averaging_two_checkpoints_is_the_mean(run_dir, tmp_path):
    out = average_checkpoints(run_dir, tmp_path / "avg", n=2, which="last")
    averaged = load_file(str(out / "model.safetensors"))
    a, b = (load_file(str(run_dir / "checkpoints" / f"step-{s}.safetensors")) for s in (3, 6))
    assert averaged.keys() == a.keys()
    for name, tensor in averaged.items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2, atol=1e-7), name
    translation = Translator.from_dir(out, device="cpu").translate(["The dog sees a cat."])
    assert translation[0][0].pieces


def test_averaging_the_best_checkpoint(run_dir, tmp_path):
    records = [json.loads(line) for line in (run_dir / "validations.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["valid_bleu"], r["step"]))["step"]
    out = average_checkpoints(run_dir, tmp_path / "best", n=1, which="best")
    expected = load_file(str(run_dir / "checkpoints" / f"step-{best}.safetensors"))
    assert all(torch.equal(t, expected[k]) for k, t in load_file(str(out / "model.safetensors")).items())


def test_averaging_errors(run_dir, tmp_path, capsys):
    with pytest.raises(ModelDirError, match="3 checkpoints asked for but only 2 exist"):
        average_checkpoints(run_dir, tmp_path / "avg", n=3)
    with pytest.raises(ModelDirError, match="not a training run directory"):
        average_checkpoints(tmp_path, tmp_path / "avg", n=1)
    with pytest.raises(ModelDirError, match="would replace the run's best model"):
        average_checkpoints(run_dir, run_dir / "model", n=1)
    with pytest.raises(SystemExit) as exit_info:
        average_main(["--run", str(run_dir), "--output", str(tmp_path / "avg"), "--n", "5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: ") and not (tmp_path / "avg").exists()


# --- forced scoring ----------------------------------------------------------------------------------
def step_by_step(model, src_ids, tgt_ids) -> list[float]:
    """Reference: feed the target one step at a time through the search contract."""
    batch = make_batch([src_ids])
    with torch.no_grad():
        enc = model.encode(batch.src, batch.src_len)
        state, prev, out = model.init_state(enc), torch.tensor([BOS_ID]), []
        for token in list(tgt_ids) + [EOS_ID]:
            logits, state, _ = model.step(prev, state, enc)
            out.append(torch.log_softmax(logits.float(), -1)[0, token].item())
            prev = torch.tensor([token])
    return out


def test_forced_scores_equal_step_by_step_log_probs(model_dir):
    bundle = load_bundle(model_dir)
    pairs = load_split(bundle.config.data, "valid")[:6]
    src, tgt = encode(bundle, [s for s, _ in pairs]), bundle.tgt_tokenizer.encode([t for _, t in pairs])
    scores = token_log_probs(bundle.model, src, tgt, batch_size=4)
    for s, t, values in zip(src, tgt, scores):
        assert len(values) == len(t) + 1
        assert values == pytest.approx(step_by_step(bundle.model, s, t), abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("eos_bias", [-30.0, 30.0])
def test_forced_scores_equal_search_scores(model_dir, beam, eos_bias):
    """Both endings, whatever the tiny model learnt: a large negative EOS bias stops every output at the
    maximum length, a large positive one with min_len=2 makes every output two tokens and EOS."""
    bundle = load_bundle(model_dir)
    with torch.no_grad():
        bundle.model.decoder.output.bias[EOS_ID] += eos_bias
    src = encode(bundle)
    batch, cfg = make_batch(src), SearchConfig(beam_size=beam, max_len_b=4, min_len=2 if eos_bias > 0 else 0)
    hyps = [nbest[0] for nbest in search(bundle.model, batch.src, batch.src_len, cfg)]
    limits = max_lengths(batch.src_len, cfg).tolist()
    ended_with_eos = [len(h.tokens) < limit for h, limit in zip(hyps, limits)]  # else no EOS term in the score
    assert all(ended_with_eos) if eos_bias > 0 else not any(ended_with_eos)
    scores = token_log_probs(bundle.model, src, [h.tokens for h in hyps])
    for hyp, values, eos in zip(hyps, scores, ended_with_eos):
        assert sum(values if eos else values[:-1]) == pytest.approx(hyp.score, abs=1e-4)


def test_score_command(model_dir, other_dir, tmp_path, capsys):
    (tmp_path / "s.txt").write_text("The dog sees a cat.\n\nA woman.\n")
    (tmp_path / "t.txt").write_text("Der Hund sieht eine Katze.\n\nEine Frau.\n")
    for models in ([model_dir], [model_dir, other_dir]):
        score_main(["--model", *map(str, models), "--src", str(tmp_path / "s.txt"), "--tgt", str(tmp_path / "t.txt"),
                    "--device", "cpu"])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3
        for line in lines:
            total, tokens, average = line.split("\t")
            assert float(total) < 0 and float(average) == pytest.approx(float(total) / int(tokens), abs=1e-3)
        assert lines[1].split("\t")[1] == "1"  # an empty target is scored as a lone EOS
    (tmp_path / "short.txt").write_text("Eine Frau.\n")
    with pytest.raises(SystemExit):
        score_main(["--model", str(model_dir), "--src", str(tmp_path / "s.txt"), "--tgt", str(tmp_path / "short.txt")])
    assert "must be line-aligned" in capsys.readouterr().err


# --- attention output --------------------------------------------------------------------------------
def translate_with_attention(model_dir, tmp_path, *flags):
    (tmp_path / "in.txt").write_text("The dog sees a cat.\n\nA woman.\n")
    translate_main(["--model", str(model_dir), "--device", "cpu", "--beam", "2", "--input", str(tmp_path / "in.txt"),
                    "--output", str(tmp_path / "out.txt"), *flags])


def test_attention_json(model_dir, tmp_path):
    translate_with_attention(model_dir, tmp_path, "--attention-json", str(tmp_path / "a.jsonl"))
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[1] == {"index": 1, "src_pieces": [], "tgt_pieces": [], "attention": []}
    for record in (records[0], records[2]):
        rows = record["attention"]
        assert len(rows) == len(record["tgt_pieces"]) and rows
        assert all(len(row) == len(record["src_pieces"]) for row in rows)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in rows)


def test_attention_png(model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    translate_with_attention(model_dir, tmp_path, "--attention-png", str(tmp_path / "png"))
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["0.png", "2.png"]  # empty line skipped
    assert (tmp_path / "png" / "0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_errors(model_dir, tmp_path, capsys, monkeypatch):
    no_attention = make_model_dir(model_dir, tmp_path / "none", attention="none")
    with pytest.raises(SystemExit):
        translate_with_attention(no_attention, tmp_path, "--attention-json", str(tmp_path / "a.jsonl"))
    assert "need a model with attention" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(SystemExit):
        translate_with_attention(model_dir, tmp_path, "--attention-png", str(tmp_path / "png"))
    assert "pip install seq2seq[plot]" in capsys.readouterr().err


# --- tuning ----------------------------------------------------------------------------------------
def test_tuning_picks_the_best_and_translator_uses_it(model_dir, tmp_path, monkeypatch):
    model = shutil.copytree(model_dir, tmp_path / "model")
    fake = iter([1.0, 5.0, 3.0, 5.0, 2.0])  # BLEU of the grid points, in grid order
    monkeypatch.setattr(tune_module, "bleu", lambda hyps, refs: Score("BLEU", next(fake), "", ""))
    result = tune(model, beams=(1, 2, 3), alphas=(0.0, 1.0), max_sentences=5, device="cpu")
    # beam 1 once (greedy ignores alpha); (2, 0.0) and (3, 0.0) tie: the smaller beam wins
    assert [(t.beam, t.alpha) for t in result.trials] == [(1, 0.0), (2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    assert (result.best.beam, result.best.alpha) == (2, 0.0)
    assert all(t.sentences_per_second > 0 for t in result.trials)
    save_search_config(model, result.search)
    assert Translator.from_dir(model, device="cpu").search_cfg.beam_size == 2
    (model / "search.yaml").write_text("beam_size: 3\nalpha: 0.5\n")
    cfg = Translator.from_dir(model, device="cpu").search_cfg
    assert (cfg.beam_size, cfg.alpha) == (3, 0.5)
    assert Translator.from_dir(model, device="cpu", beam_size=4).search_cfg.beam_size == 4  # the command line wins
    (model / "search.yaml").write_text("beam_sise: 3\n")
    with pytest.raises(ModelDirError, match="search.yaml: bad search settings"):
        Translator.from_dir(model, device="cpu")


def test_tuning_with_workers_scores_the_same_translations(model_dir, monkeypatch, capsys):
    scored, pools = [], []
    monkeypatch.setattr(tune_module, "bleu", lambda hyps, refs: scored.append(hyps) or Score("BLEU", 1.0, "", ""))
    real_map = Translator._map
    monkeypatch.setattr(Translator, "_map", lambda self, *a: (real_map(self, *a), pools.append(self._pool))[0])
    for workers in (1, 2):
        tune(model_dir, beams=(1, 2), alphas=(0.0,), max_sentences=9, device="cpu", batch_size=2, workers=workers)
    assert pools[-1] is not None and scored[:2] == scored[2:] and any(any(h) for h in scored)  # pool: 2 workers
    with pytest.raises(SystemExit):
        tune_module.main(["--model", str(model_dir), "--device", "cpu", "--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_tune_command_saves_search_yaml(model_dir, tmp_path, capsys):
    model = shutil.copytree(model_dir, tmp_path / "model")
    tune_module.main(["--model", str(model), "--beams", "1,2", "--alphas", "0,1", "--max-sentences", "4",
                      "--device", "cpu", "--save"])
    out = capsys.readouterr().out
    assert "<- best" in out and "best: beam" in out
    saved = (model / "search.yaml").read_text()
    assert "beam_size:" in saved and "!!python" not in saved
    args = ["--model", str(model), "--beams", "1,2", "--alphas", "0", "--max-sentences", "4", "--device", "cpu"]
    with pytest.raises(SystemExit):
        tune_module.main([*args, "--shortlist"])
    assert "no shortlist; build one with" in capsys.readouterr().err
    shortlist_main(["--model", str(model)])
    tune_module.main([*args, "--shortlist"])
    assert "best: beam" in capsys.readouterr().out
