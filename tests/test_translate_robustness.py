"""Translate survives anything piped into it: one output line per input line, streamed."""
import io
import threading
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.cli import one_line
from seq2seq.config import ConfigError
from seq2seq.train import train
from seq2seq.translate import Translator
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data=dict(truncate_len=20), trainer=dict(max_steps=2, valid_every=2)), run_dir)
    return Translator.from_dir(run_dir / "model", device="cpu", batch_size=8, max_len_a=0.5, max_len_b=3)


def run_cli_path(translator, data: bytes) -> list[str]:
    """What the translate command does with standard input, minus the process."""
    source = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline="\n")
    return [one_line(n[0].text) for n in translator.translate_stream(source, chunk_size=16)]


def expected_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=60), max_size=30),
       st.binary(max_size=40), st.booleans())
def test_any_input_gives_one_output_line_per_input_line(translator, lines, junk, final_newline):
    data = "\n".join(lines).encode("utf-8") + junk.replace(b"\n", b"") + (b"\n" if final_newline else b"")
    outputs = run_cli_path(translator, data)
    assert len(outputs) == expected_lines(data)
    assert all(len(o.splitlines()) <= 1 for o in outputs)  # no output smuggles in a line break


def test_empty_whitespace_and_long_lines(translator, caplog):
    data = "\n   \n\t\x0b\x0c\u2028 \nThe dog sees the cat.\n" + "the big dog " * 200 + "\n"
    outputs = run_cli_path(translator, data.encode())
    assert len(outputs) == 5 and outputs[0] == outputs[1] == outputs[2] == ""
    assert any("only the first 20 are translated" in r.message for r in caplog.records)


def test_input_is_streamed_in_bounded_chunks(translator):
    consumed = 0

    def endless():
        nonlocal consumed
        while True:
            consumed += 1
            yield "The dog sees the cat.\n"

    stream = translator.translate_stream(endless(), chunk_size=16)
    for _ in range(20):
        next(stream)
    assert consumed <= 32  # two chunks read, not the whole (endless) input


def test_int8_quantised_translator_translates(translator):
    quantised = Translator(translator.bundle, translator.search_cfg, device="cpu", quantize=True)
    lines = ["The dog sees the cat.", "", "Two old men will buy a red car."]
    out = quantised.translate(lines)
    assert len(out) == 3 and out[1][0].text == ""
    assert type(quantised.model.decoder.output).__module__.startswith("torch.ao.nn.quantized")
    assert type(translator.model.decoder.output) is torch.nn.Linear  # the original model is untouched
    attention = quantised.model.decoder.attention  # its energy vector stays float32 for the C kernel
    assert type(attention.energy) is torch.nn.Linear and type(attention.query_proj) is not torch.nn.Linear


def test_bf16_translator_runs_its_matrix_products_in_bfloat16(translator):
    lines = ["The dog sees the cat.", "", "Two old men will buy a red car."]
    bf16 = Translator(translator.bundle, translator.search_cfg, device="cpu", bf16=True)
    out = bf16.translate(lines)
    assert len(out) == 3 and out[1][0].text == "" and out[0][0].text
    decoder = bf16.model.decoder
    cached = [value for name, (_, value) in decoder._decoding_cache.items()
              if isinstance(name, tuple) and name[0] == "bf16"]  # keys: "cell", "packed output", ("bf16", id)
    assert len(cached) == 5 and all(w.dtype == torch.bfloat16 for w in cached)  # every product of the step ran in bf16
    pre_output = torch.randn(7, decoder.output.in_features)
    with torch.no_grad():
        logits = decoder.project(pre_output)
        expected = (pre_output.bfloat16() @ decoder.output.weight.t().bfloat16()).float() + decoder.output.bias
        assert logits.dtype == torch.float32 and torch.allclose(logits, expected, atol=1e-3)
        assert not torch.equal(logits, decoder.output(pre_output))  # not the float32 product
        decoder.output.weight.mul_(2)  # a changed weight is cast again, not served from the cache
        assert torch.allclose(decoder.project(pre_output) - decoder.output.bias, 2 * (expected - decoder.output.bias),
                              atol=1e-2)
        decoder.output.weight.div_(2)


def test_workers_translate_batches_side_by_side_with_the_same_results(translator):
    lines = ["The dog sees the cat.", "", "Two old men will buy a red car.", "A woman.", "The cat runs.",
             "A man and a dog in the park.", "Red car.", "The old men see the big dog."] * 2
    cfg = replace(translator.search_cfg, beam_size=3, batch_size=2)
    one = Translator(translator.bundle, cfg, device="cpu").translate(lines, n_best=2, return_attention=True)
    two = Translator(translator.bundle, cfg, device="cpu", workers=2)
    both = two.translate(lines, n_best=2, return_attention=True)
    assert [[(h.text, h.score) for h in n] for n in both] == [[(h.text, h.score) for h in n] for n in one]
    assert all(h.attention is None and g.attention is None or torch.equal(h.attention, g.attention)
               for n, m in zip(both, one) for h, g in zip(n, m))
    threads = set()
    assert list(two._map(lambda _: threads.add(threading.current_thread().name), range(8))) == [None] * 8
    assert threads and all(name.startswith("seq2seq-decode") for name in threads)


def test_workers_need_a_cpu_and_at_least_one(translator, monkeypatch):
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        Translator(translator.bundle, translator.search_cfg, device="cpu", workers=0)
    monkeypatch.setattr("seq2seq.translate.resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(ConfigError, match="on a GPU use one worker"):
        Translator(translator.bundle, translator.search_cfg, device="cuda", workers=2)
