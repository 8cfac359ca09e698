"""Per-request state: tokens, progress through the KV cache, sampling params, outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from serve.engine.sampling_params import SamplingParams


class EngineInputError(ValueError):
    """A request the engine refuses (bad prompt, too long, duplicate id). One clear line."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one ``step()`` produced for one request.

    ``new_logprobs`` is one dict per new token (token id -> logprob of the top-n tokens plus the
    sampled one), or None when ``params.logprobs == 0``.
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prefix-cache hit at the first admission
    admitted_once: bool = False
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of full blocks of all_token_ids
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
