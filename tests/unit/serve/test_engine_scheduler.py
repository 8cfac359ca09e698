import torch

from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.request import Sequence, Status
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import Scheduler


def make(num_blocks=32, max_seqs=8, budget=16) -> Scheduler:
    kv = KVCacheManager(
        num_blocks=num_blocks,
        block_size=4,
        n_layers=1,
        n_kv_heads=1,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        model_id="m",
    )
    return Scheduler(kv, max_seqs, budget)


def advance(s: Scheduler, batch) -> None:
    """What the engine does after a forward: mark computed, append a token when caught up."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=False):
        seq.num_computed_tokens += n
        s.kv.commit(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)


def test_budget_chunks_prefill_and_decode_goes_first():
    s = make(budget=8)
    a = Sequence("a", list(range(5)), SamplingParams())
    b = Sequence("b", list(range(20, 40)), SamplingParams())
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert [x.request_id for x in first.seqs] == ["a", "b"] and first.num_new_tokens == [5, 3]
    advance(s, first)
    second = s.schedule()  # a decodes (1), b continues its prefill with the rest of the budget
    assert second.num_new_tokens == [1, 7] and second.total_tokens == 8
    advance(s, second)
    third = s.schedule()
    assert third.num_new_tokens == [1, 7]


def test_max_num_seqs_and_fcfs():
    s = make(max_seqs=2, budget=64)
    seqs = [Sequence(str(i), [i] * 3, SamplingParams()) for i in range(4)]
    for q in seqs:
        s.add(q)
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["0", "1"]
    assert [q.request_id for q in s.waiting] == ["2", "3"]


def test_preempts_newest_and_requeues_it_first():
    s = make(num_blocks=4, budget=64)  # 16 token slots
    a = Sequence("a", list(range(7)), SamplingParams())
    b = Sequence("b", list(range(50, 57)), SamplingParams())
    s.add(a)
    s.add(b)
    advance(s, s.schedule())  # both prefilled: 2 blocks each (7 + 1 token)
    advance(s, s.schedule())  # decode: each now has 9 tokens -> needs a third block
    batch = s.schedule()
    assert [q.request_id for q in batch.preempted] == ["b"]
    assert [q.request_id for q in batch.seqs] == ["a"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and s.waiting[0] is b
    assert s.num_preemptions == 1
    s.remove(a)
    assert s.kv.pool.num_free == 4
