"""`overlap.pipeline.policy.split`: the microbatch rule, against the rule written out independently.

count = max(ceil(T / 512), min(microbatches, T // min_tokens), 1)     (T // 0 counts as T)
size  = ceil(T / count)
"""

from __future__ import annotations

import pytest

from overlap.pipeline.policy import MAX_TOKENS_PER_CALL, Split, split


def rule(total: int, microbatches: int, min_tokens: int) -> tuple[int, int]:
    if total == 0:
        return 0, 0
    whole = total // min_tokens if min_tokens else total  # rounded down: a microbatch needs min_tokens
    count = max(-(-total // 512), min(microbatches, whole), 1)
    return count, -(-total // count)


@pytest.mark.parametrize(
    "total,microbatches,min_tokens,count,size",
    [
        (40, 4, 32, 1, 40),  # 40 / 32 = 1.25: one microbatch (rounded up it would be 2)
        (63, 2, 32, 1, 63),  # just under two microbatches' worth
        (64, 2, 32, 2, 32),  # exactly two
        (95, 4, 32, 2, 48),  # 2.97 -> 2
        (96, 4, 32, 3, 32),
        (10, 4, 32, 1, 10),  # too small to split
        (31, 1, 32, 1, 31),
        (1000, 1, 32, 2, 500),  # never more than 512 tokens a call
        (512, 1, 0, 1, 512),
        (513, 1, 0, 2, 257),
        (1025, 2, 32, 3, 342),  # the 512 cap wins over microbatches
        (256, 4, 0, 4, 64),  # min_tokens 0: T // 0 counts as T
        (3, 8, 0, 3, 1),  # ... and never more microbatches than tokens
        (1, 2, 32, 1, 1),
        (0, 2, 32, 0, 0),  # no tokens anywhere: nothing to exchange
    ],
)
def test_split_by_hand(total, microbatches, min_tokens, count, size):
    got = split(total, microbatches, min_tokens)
    assert (got.total, got.count, got.size) == (total, count, size)


def test_split_equals_the_rule_everywhere_small():
    for total in range(0, 1100, 7):
        for microbatches in (1, 2, 3, 4, 8):
            for min_tokens in (0, 1, 5, 32, 100, 600):
                got = split(total, microbatches, min_tokens)
                assert (got.count, got.size) == rule(total, microbatches, min_tokens), (total, microbatches, min_tokens)
                if total:
                    assert got.size <= MAX_TOKENS_PER_CALL and got.count * got.size >= total
                    assert got.count <= max(-(-total // 512), microbatches, 1)


@pytest.mark.parametrize("microbatches,min_tokens", [(0, 32), (-1, 32), (True, 32), (2.0, 32), (2, -1), (2, None)])
def test_split_refuses_bad_parameters(microbatches, min_tokens):
    with pytest.raises(ValueError, match="microbatches must be an int >= 1|min_tokens must be an int >= 0"):
        split(100, microbatches, min_tokens)
    with pytest.raises(ValueError, match="total must be >= 0 tokens, got -1"):
        split(-1)


def test_chunks_pad_to_the_agreed_size():
    import torch

    s = Split(total=5, count=2, size=3)
    x = torch.arange(5.0)[:, None]
    part, mask = s.chunk(x, 1)
    assert part[:, 0].tolist() == [3.0, 4.0, 0.0] and mask.tolist() == [True, True, False]
    assert s.pad(x).shape == (6, 1) and s.rows(1) == slice(3, 6)
