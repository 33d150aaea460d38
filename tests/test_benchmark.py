"""The benchmark script end to end, briefly: a tiny model on the built-in corpus."""
import json

import pytest

from seq2seq.benchmark import main, peer_comparison
from seq2seq.runtime import cpu_has_bf16_products

TINY = ["model.emb_size=16", "model.enc_hidden_size=16", "model.dec_hidden_size=16", "model.attention_size=16",
        "data.tokenizer.vocab_size=200"]


def test_benchmark_reports_training_figures(tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        main(["--threads", "1", "--train-seconds", "5", "--out", str(out), *TINY, f"trainer.precision={precision}"])
        result = results[precision] = json.loads(out.read_text())
        assert result["train_tokens_per_s"] > 0 and result["train_steps"] > 0 and result["train_peak_rss_mib"] > 0
        assert result["fraction_of_matmul_rate"] > 0
        if precision == "fp32" or cpu_has_bf16_products():  # else bf16's slow fallback rate is no ceiling
            assert result["fraction_of_matmul_rate"] < 1
    # the model's arithmetic, not bfloat16's padded rows: the same count in both precisions
    assert results["bf16"]["flop_per_token"] == results["fp32"]["flop_per_token"]
    # trainer.accumulate=2: a step takes two batches (the tokens per step are counted over both)
    out = tmp_path / "accumulate.json"
    main(["--threads", "1", "--train-seconds", "3", "--out", str(out), *TINY, "trainer.accumulate=2"])
    accumulated = json.loads(out.read_text())["tokens_per_step"]
    assert 1.8 * results["fp32"]["tokens_per_step"] < accumulated < 2.2 * results["fp32"]["tokens_per_step"]


PEER = {"toolkit": "onmt", "train": {"tgt_tok_per_s_median": 4000.0}, "train_time": {"peak_rss_mib": 1600.0},
        "decode": {"beam1": {"sent_per_s": 500.0, "bleu": 30.0, "process_peak_rss_mib": 400.0},
                   "beam5": {"sent_per_s": 200.0, "bleu": 32.0, "process_peak_rss_mib": 500.0}}}


def test_peer_comparison_sets_our_figures_beside_the_peers():
    decoding = [{"beam": 5, "batch_size": 64, "variant": "bf16", "stopping": "early", "sentences_per_s": 400.0,
                 "bleu": 33.0, "peak_rss_mib": 410.0},
                {"beam": 5, "batch_size": 16, "variant": "bf16", "stopping": "early", "sentences_per_s": 100.0,
                 "bleu": 33.0, "peak_rss_mib": 300.0},  # not the peers' batch size: left out
                {"beam": 3, "batch_size": 64, "variant": "bf16", "stopping": "early", "sentences_per_s": 450.0,
                 "bleu": 33.0, "peak_rss_mib": 300.0}]  # a beam the peers did not decode with: left out
    result = {"train_tokens_per_s": 9000.0, "train_peak_rss_mib": 1300.0, "decoding": decoding}
    rows = {row["figure"]: row for row in peer_comparison(result, PEER)}
    assert set(rows) == {"training, target tokens/s", "peak memory, training (MiB)",
                         "decoding bf16 beam 5 (early stopping), sentences/s",
                         "decoding bf16 beam 5 (early stopping), peak memory (MiB)",
                         "decoding bf16 beam 5 (early stopping), BLEU"}
    assert rows["training, target tokens/s"]["ratio"] == pytest.approx(2.25)
    assert rows["decoding bf16 beam 5 (early stopping), sentences/s"]["ratio"] == pytest.approx(2.0)
    assert rows["peak memory, training (MiB)"]["theirs"] == 1600.0


def test_benchmark_compares_with_a_peer_summary(tmp_path, capsys):
    peer, out = tmp_path / "summary.json", tmp_path / "benchmark.json"
    peer.write_text(json.dumps(PEER))
    main(["--threads", "1", "--train-seconds", "5", "--peer", str(peer), "--out", str(out), *TINY])
    comparison = json.loads(out.read_text())["peer"]["comparison"]
    assert [row["figure"] for row in comparison] == ["training, target tokens/s", "peak memory, training (MiB)"]
    assert comparison[0]["ratio"] == pytest.approx(comparison[0]["ours"] / 4000.0)
    assert "| training, target tokens/s |" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["{not json", json.dumps({"toolkit": "onmt", "train": {}})])
def test_benchmark_rejects_a_file_that_is_not_a_peer_summary(content, tmp_path, capsys):
    peer = tmp_path / "summary.json"
    peer.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--train-seconds", "0", "--peer", str(peer), "--out", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    assert f"--peer {peer}" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()  # it stopped before any run


def test_benchmark_rejects_an_unknown_decoding_variant(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--train-seconds", "0", "--decode-variants", "fp32,int8+shortlists", "--out", str(tmp_path / "b.json")])
    assert "unknown variant 'int8+shortlists'" in capsys.readouterr().err
