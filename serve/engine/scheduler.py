"""Iteration-level continuous batching with a per-step token budget (chunked prefill).

Each ``schedule()`` decides how many tokens every sequence computes in the next forward:
1. running sequences that are decoding (one token each), oldest first;
2. running sequences still in (chunked) prefill, with what budget is left;
3. waiting sequences in FCFS order (a preempted sequence goes back to the front), each reusing
   its longest cached prefix and computing as much of the rest as the budget allows, while
   ``max_num_seqs`` and the KV pool allow; the head of the queue is never skipped.
When a running sequence cannot get a KV block, the newest running sequence is preempted by
recompute (its blocks are freed; it re-enters the waiting queue's front and later recomputes
its prompt + generated tokens, mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.request import Sequence, Status


@dataclass
class ScheduledBatch:
    """Sequences to run this step, in order, with the number of new tokens each computes."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, kv_connector: Any = None
    ) -> None:
        self.kv = kv
        self.kv_connector = kv_connector  # imports blocks fetched from a shared store before the prefix match
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order (oldest first)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        out = ScheduledBatch()
        decoding = [s for s in self.running if s.num_computed_tokens == s.num_tokens - 1]
        prefilling = [s for s in self.running if s.num_computed_tokens < s.num_tokens - 1]
        for seq in decoding + prefilling:
            if seq.status is not Status.RUNNING or budget <= 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running[-1]
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled[seq.request_id] = n
                budget -= n
        if not out.preempted:
            budget = self._admit(budget, scheduled)
        for seq in self.running:
            if seq.request_id in scheduled:
                out.seqs.append(seq)
                out.num_new_tokens.append(scheduled[seq.request_id])
        return out

    def _admit(self, budget: int, scheduled: dict[str, int]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.kv_connector is not None:
                self.kv_connector.load(seq)
            cached = self.kv.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.allocate(seq, n, cached_blocks=cached):
                break
            self.waiting.popleft()
            if not seq.admitted_once:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted_once = True
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled[seq.request_id] = n
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, out: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
