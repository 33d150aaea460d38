"""The benchmark script end to end, briefly: a tiny model on the built-in corpus."""
import json

import pytest

from seq2seq.benchmark import main

TINY = ["model.emb_size=16", "model.enc_hidden_size=16", "model.dec_hidden_size=16", "model.attention_size=16",
        "data.tokenizer.vocab_size=200"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_benchmark_reports_training_figures(precision, tmp_path):
    out = tmp_path / "benchmark.json"
    main(["--threads", "1", "--train-seconds", "5", "--out", str(out), *TINY, f"trainer.precision={precision}"])
    result = json.loads(out.read_text())
    assert result["train_tokens_per_s"] > 0 and result["train_steps"] > 0 and result["train_peak_rss_mib"] > 0
    assert 0 < result["fraction_of_matmul_rate"] < 1
