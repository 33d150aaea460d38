"""Token-bucketed training batches: every example once, the token budget, sentence-count multiples."""
import random

import pytest

from seq2seq.batch import token_batches


def lengths(n, seed=0):
    rng = random.Random(seed)
    tgt = [rng.randint(1, 40) for _ in range(n)]
    return [t + rng.randint(-3, 3) + 3 for t in tgt], tgt


@pytest.mark.parametrize("multiple", [1, 8])
def test_every_example_once_within_the_budget(multiple):
    src, tgt = lengths(3000)
    batches = token_batches(src, tgt, 600, seed=1, epoch=0, multiple=multiple)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    for batch in batches:
        assert len(batch) * (max(tgt[i] for i in batch) + 1) <= 600
        assert max(tgt[i] for i in batch) - min(tgt[i] for i in batch) <= 3  # similar lengths together
    if multiple > 1:
        # at least 14 sentences fit in every batch: only the epoch's last, partial batch may be no multiple
        assert len([b for b in batches if len(b) % multiple]) <= 1


def test_same_seed_and_epoch_same_batches_other_epoch_other_order():
    src, tgt = lengths(500)
    first = token_batches(src, tgt, 300, seed=2, epoch=3, multiple=8)
    assert first == token_batches(src, tgt, 300, seed=2, epoch=3, multiple=8)
    assert first != token_batches(src, tgt, 300, seed=2, epoch=4, multiple=8)


def test_multiple_of_eight_on_uniform_lengths():
    tgt = [9] * 1000  # 10 tokens each with EOS: 30 fit in 300 tokens, cut to 24
    batches = token_batches(tgt, tgt, 300, seed=0, epoch=0, multiple=8)
    assert sorted(len(b) for b in batches)[1:] == [24] * (len(batches) - 1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert [len(b) for b in token_batches(tgt, tgt, 300, 0, 0)].count(30) == 33  # multiple 1: as many as fit


def test_a_batch_across_two_target_lengths_takes_sources_of_similar_length():
    """Targets of 4 and 6 tokens (none of 5), each with sources of 1..50, 24 or fewer sentences a batch: sorted by
    (target, source) alone, the batch holding the end of the first group and the start of the second pads
    1-token sources to 50; with the second group's sources sorted the other way it takes 36-50 from it."""
    tgt = [4] * 50 + [6] * 50
    src = list(range(1, 51)) * 2
    batches = token_batches(src, tgt, 120, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(100))
    for batch in batches:
        lengths = [src[i] for i in batch]
        assert max(lengths) - min(lengths) < 24, sorted(lengths)
