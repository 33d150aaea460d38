import os
from pathlib import Path

import pytest
import torch

from seq2seq.config import Config, ModelConfig, to_config

ROOT = Path(__file__).resolve().parent.parent
MULTI30K = Path(os.environ.get("MULTI30K", ROOT.parent / "shared" / "data" / "multi30k"))

torch.set_num_threads(1)


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(emb_size=16, enc_hidden_size=16, dec_hidden_size=16, attention_size=16, dropout=0.0,
                  emb_dropout=0.0)
    values.update(overrides)
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def tiny_config(**sections) -> Config:
    """A whole training config for fast runs on a small slice of the built-in corpus."""
    base = {
        "model": dict(emb_size=32, enc_hidden_size=32, dec_hidden_size=32, attention_size=32, dropout=0.0,
                      emb_dropout=0.0),
        "data": dict(builtin_size=300, valid_max_sentences=40, tokenizer=dict(vocab_size=120)),
        "trainer": dict(device="cpu", max_steps=6, max_epochs=0, valid_every=3, batch_tokens=600,
                        log_every=2, threads=1, test_after=False),
        "search": dict(batch_size=32),
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return to_config(base)


def same_weights_on_every_rank(model) -> bool:
    """Under torchrun: whether every rank holds rank 0's weights (an all-gather of the flattened parameters)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


@pytest.fixture
def tiny_cfg():
    return tiny_config()
