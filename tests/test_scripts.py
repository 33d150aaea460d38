"""End to end: the three scripts on the built-in corpus, as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.emb_size=32", "model.enc_hidden_size=32", "model.dec_hidden_size=32", "model.attention_size=32",
        "data.builtin_size=300", "data.valid_max_sentences=40", "data.tokenizer.vocab_size=120",
        "trainer.max_steps=8", "trainer.valid_every=4", "trainer.batch_tokens=800", "trainer.threads=1",
        "trainer.device=cpu"]


def run(script: str, *args: str, stdin: bytes = b"", check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], input=stdin,
                            capture_output=True, cwd=ROOT, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"{script} failed:\n{result.stderr.decode()[-3000:]}")
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run("train.py", *TINY, f"hydra.run.dir={run_dir}")
    assert b"test (test, greedy): BLEU = " in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "nrefs:1" in summary["test_bleu"]["signature"]
    return run_dir / "model"


def test_translate_keeps_one_line_per_input_line(model_dir, tmp_path):
    lines = ["The dog sees a cat.", "", "   ", "Two old men will buy the red car in the park.",
             "\x07control\x1b chars", "The " * 300 + "dog."]
    stdin = ("\n".join(lines) + "\n").encode() + b"invalid \xff\xfe utf-8\n" + b"no final newline"
    result = run("translate.py", "--model", str(model_dir), "--device", "cpu", "--batch-size", "2", stdin=stdin)
    out = result.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines) + 2
    assert out[1] == "" and out[2] == ""
    assert b"source pieces; only the first" in result.stderr  # the over-long line was cut, with a warning
    assert b"invalid UTF-8 in the input is replaced by U+FFFD" in result.stderr
    assert b"2 invalid UTF-8 sequences were replaced" in result.stderr  # \xff and \xfe
    (tmp_path / "in.txt").write_text("A dog.\n\nA cat.\n")
    run("translate.py", "--model", str(model_dir), "--input", str(tmp_path / "in.txt"), "--output",
        str(tmp_path / "out.txt"))
    assert len((tmp_path / "out.txt").read_text().split("\n")) == 4


def test_evaluate_scores_a_split_and_files(model_dir, tmp_path):
    result = run("evaluate.py", "--model", str(model_dir), "--split", "valid", "--out", str(tmp_path / "ev"))
    assert b"BLEU = " in result.stdout and b"chrF2" in result.stdout
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["sentences"] == 500 and "tok:13a" in report["bleu"]["signature"]
    assert len((tmp_path / "ev" / "hypotheses.txt").read_text().splitlines()) == 500
    (tmp_path / "s.txt").write_text("The dog sees a cat.\n")
    (tmp_path / "r.txt").write_text("Der Hund sieht eine Katze.\n")
    run("evaluate.py", "--model", str(model_dir), "--src", str(tmp_path / "s.txt"), "--ref", str(tmp_path / "r.txt"),
        "--out", str(tmp_path / "ev2"))
    assert json.loads((tmp_path / "ev2" / "report.json").read_text())["sentences"] == 1


@pytest.mark.parametrize("script,args,message", [
    ("translate.py", ["--model", "/nonexistent"], "error: /nonexistent: model directory not found"),
    ("translate.py", ["--model", "{model}", "--beam", "0"], "error: --beam must be at least 1"),
    ("translate.py", ["--model", "{model}", "--input", "/nonexistent.txt"], "error: /nonexistent.txt: input file"),
    ("evaluate.py", ["--model", "{model}", "--src", "/nonexistent.de", "--ref", "/x.en"], "file not found"),
    ("train.py", ["model.cell=transformer"], "error: model.cell='transformer' is not one of rnn, gru, lstm"),
    ("train.py", ["data=multi30k", "data.path=/nonexistent", "data.hub_name=null"],
     "error: data.path=/nonexistent: directory not found and no data.hub_name"),
])
def test_user_errors_are_one_line(model_dir, script, args, message):
    result = run(script, *[a.replace("{model}", str(model_dir)) for a in args], check=False)
    assert result.returncode == 2
    stderr = result.stderr.decode().strip()
    assert message in stderr and "Traceback" not in stderr, stderr


def test_translate_search_flags_and_n_best(model_dir):
    result = run("translate.py", "--model", str(model_dir), "--beam", "3", "--n-best", "2", "--length-penalty",
                 "average", "--stopping", "early", "--min-len", "2", "--no-repeat-ngram", "2", "--forbid-unk",
                 stdin=b"The dog sees a cat.\n\nA man.\n")
    rows = [line.split("\t") for line in result.stdout.decode().splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 1, 2, 2] and all(len(r) == 3 for r in rows)  # empty line: one row
    assert float(rows[0][1]) >= float(rows[1][1])  # best first
    assert run("translate.py", "--model", str(model_dir), "--n-best", "2", check=False).returncode == 2
