"""Host-side pieces of the Triton paged attention (pure Python: run everywhere)."""

from serve.engine.paged_attention import (
    decode_splits,
    query_blocks,
    varlen_block_q,
    varlen_scratch_rows,
    varlen_splits,
)
from serve.engine.piecewise_graphs import token_buckets


def test_query_blocks_cover_every_row_once_within_one_sequence():
    spans = [(0, 37, 0), (37, 5, 20), (42, 1, 300), (43, 16, 16)]  # (first row, rows, position of the first)
    blocks = query_blocks(spans, 16)
    assert blocks[:3] == [(0, 16, 0, 0), (16, 16, 0, 16), (32, 5, 0, 32)]
    covered = [r for row0, n, _, _ in blocks for r in range(row0, row0 + n)]
    assert covered == list(range(59))
    for row0, n, seq, pos0 in blocks:
        first_row, rows, first_pos = spans[seq]
        assert first_row <= row0 and row0 + n <= first_row + rows and 1 <= n <= 16
        assert pos0 - first_pos == row0 - first_row  # positions follow rows inside a sequence


def test_block_and_split_sizes_and_the_scratch_they_need():
    assert [varlen_block_q(t) for t in (16, 128, 256, 2048)] == [16, 16, 64, 64]
    assert [varlen_splits(t) for t in (16, 128, 256, 512, 1024)] == [8, 8, 4, 4, 2]
    buckets = token_buckets(2048)
    assert buckets == [16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    rows = varlen_scratch_rows(buckets)
    assert rows == 2 * 2048 and all(varlen_splits(t) * t <= rows for t in buckets)
    # the most query blocks a bucket can need: every sequence may start a partial block
    t, seqs = 128, 64
    spans = [(i, 1, 0) for i in range(seqs - 1)] + [(seqs - 1, t - seqs + 1, 0)]
    assert len(query_blocks(spans, varlen_block_q(t))) <= -(-t // varlen_block_q(t)) + seqs


def test_decode_splits_fill_the_gpu_then_stop():
    # (sequence, head) programs of a 12-head model at batch 1, 8, 16, 64 on 132 SMs: >= 528 programs
    assert [decode_splits(12 * b) for b in (1, 8, 16, 64)] == [8, 8, 4, 1]
    assert decode_splits(8, sms=8) == 4 and decode_splits(32, sms=8) == 1 and decode_splits(200) == 4
