"""Per-request sampling parameters, validated on construction with one-line messages."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 5


@dataclass
class SamplingParams:
    """``temperature == 0`` is greedy. ``top_k == 0`` / ``top_p == 1`` disable those filters.

    ``seed`` makes a request's samples reproducible whatever else is in the batch. The engine
    stops at ``max_tokens``, at any of ``stop_token_ids``, or at the model's EOS unless
    ``ignore_eos``. ``logprobs`` = n asks for the top-n log-probabilities (of the unmodified
    model distribution) of every generated position, plus the sampled token's.
    Stop *strings* are the server's job (it detokenizes incrementally).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        from serve.engine.request import EngineInputError

        def bad(msg: str) -> None:
            raise EngineInputError(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (0.0 <= float(self.temperature) <= 100.0):
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < float(self.top_p) <= 1.0):
            bad(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            bad(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
