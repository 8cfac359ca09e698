"""``LLMEngine``: add requests, ``step()`` the batch, read outputs. Pure PyTorch, no Ray.

Threading: ``step()`` (and ``generate``) must be driven by ONE thread or task at a time.
``add_request`` and ``abort`` may be called from any thread or coroutine at any time: they
validate synchronously (raising ``EngineInputError``), then queue the operation under a lock;
``step()`` applies queued operations, in order, before scheduling. ``stats()`` and
``has_unfinished()`` are safe anywhere (a snapshot; may lag by one step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.config.engine import EngineConfig
from cluster.errors import ConfigError
from cluster.model import Transformer
from serve.engine.hashing import model_identity
from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.model_runner import ModelRunner, PendingTokens
from serve.engine.request import EngineInputError, RequestOutput, Sequence, Status
from serve.engine.sampler import Sampler
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # 0-1, fraction of blocks referenced by live sequences
    num_blocks_total: int
    num_blocks_free: int
    prefix_queries: int  # cumulative tokens looked up in the prefix cache
    prefix_hits: int  # cumulative tokens found
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


@dataclass
class Completion:
    """One finished request from ``generate``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    num_cached_tokens: int
    ttft_s: float  # from add to first token
    e2e_s: float  # from add to finish


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def warm_quantized_kernels(model: Transformer, device: torch.device) -> None:
    """Choose every quantized linear's kernel now, for both batch buckets (and build Retort's own CPU
    kernels if this machine has not yet), so that a replica is ready only once the first requests will
    not pay for it: a first-use compile took longer than a whole short load test."""
    from cluster.quant import QuantLinear

    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return
    with torch.no_grad():
        for n in sorted({1, min(16, model.cfg.max_seq_len)}):
            model(torch.zeros(1, n, dtype=torch.long, device=device))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap, deterministic fingerprint: names, shapes, dtypes and the first values of each tensor."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        cfg: EngineConfig,
        eos_token_id: int | None = None,
        *,
        model_id: str | None = None,
        kv_connector: Any = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        mc = model.cfg
        self.vocab_size = mc.vocab_size
        self.max_model_len = cfg.max_model_len or mc.max_seq_len
        if self.max_model_len > mc.max_seq_len:
            raise ConfigError(
                f"engine max_model_len {self.max_model_len} exceeds the model's max_seq_len {mc.max_seq_len}"
            )
        if eos_token_id is not None and not 0 <= eos_token_id < mc.vocab_size:
            raise ConfigError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {mc.vocab_size})")
        self.eos_token_id = eos_token_id
        fingerprint = weights_fingerprint(model) if model_id is None else ""
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        warm_quantized_kernels(self.model, self.device)
        self.model_id = model_id or model_identity(
            mc.model_dump_json(), str(self.dtype), cfg.block_size, fingerprint
        )
        num_blocks = self._num_blocks()
        self.kv = KVCacheManager(
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            n_layers=mc.n_layers,
            n_kv_heads=mc.n_kv_heads,
            head_dim=mc.dim_head,
            dtype=self.dtype,
            device=self.device,
            model_id=self.model_id,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )
        self.kv_connector = kv_connector  # shared KV store hooks (serve.kv.connector.KVConnector) or None
        if kv_connector is not None:
            kv_connector.bind(self.kv)
        self.scheduler = Scheduler(
            self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, kv_connector=kv_connector
        )
        self.runner = ModelRunner(
            self.model,
            self.kv,
            self.device,
            cuda_graphs=not cfg.enforce_eager,
            max_batch=cfg.max_num_seqs,
            max_model_len=self.max_model_len,
            max_tokens=cfg.max_num_batched_tokens,
            compile=cfg.compile
            if "RETORT_ENGINE_COMPILE" not in os.environ
            else os.environ["RETORT_ENGINE_COMPILE"] == "1",
            max_steps=cfg.num_scheduler_steps,
        )
        self.sampler = Sampler(self.device, cfg.seed)
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, Sequence | str]] = deque()
        self._live: set[str] = set()  # ids added and not yet reported finished
        self._seqs: dict[str, Sequence] = {}  # ids known to the scheduler
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # async scheduling: a multi-step burst whose tokens are not applied yet (its sequences, its tokens)
        self.async_scheduling = (
            cfg.async_scheduling if cfg.async_scheduling is not None else self.runner.graphs is not None
        )
        self._inflight: tuple[list[Sequence], PendingTokens] | None = None

    # -- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], cfg: EngineConfig, kv_connector: Any = None
    ) -> LLMEngine:
        """Load a checkpoint directory (quantized ones too); EOS from its config files if present."""
        from cluster.checkpoint import load_model

        model = load_model(path)
        return cls(model, cfg, eos_token_id=read_eos_token_id(path), kv_connector=kv_connector)

    def _num_blocks(self) -> int:
        c, mc = self.cfg, self.model.cfg
        per = KVCacheManager.bytes_per_block(
            c.block_size, mc.n_layers, mc.n_kv_heads, mc.dim_head, self.dtype
        )
        if c.num_blocks is not None:
            return c.num_blocks
        if c.kv_memory_bytes is not None:
            n = c.kv_memory_bytes // per
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            n = int(free * c.gpu_memory_utilization) // per
        else:
            want = c.max_num_seqs * math.ceil(self.max_model_len / c.block_size) + 1
            n = min(want, _available_ram() // 4 // per)
        if n < 2:
            raise ConfigError(
                f"KV pool too small: {n} blocks of {per} bytes; raise kv_memory_bytes or num_blocks"
            )
        return int(n)

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, salt: str | None = None
    ) -> None:
        """Validate and queue a request; it joins the batch at the next ``step()``."""
        if not isinstance(params, SamplingParams):
            raise EngineInputError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_token_ids)
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise EngineInputError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the messages, {params.max_tokens} in the completion)."
            )
        need = math.ceil(total / self.cfg.block_size)
        if need > self.kv.pool.num_blocks:
            raise EngineInputError(
                f"request needs {need} KV blocks ({total} tokens) but the KV cache holds only {self.kv.pool.num_blocks}"
            )
        seq = Sequence(request_id=request_id, prompt_token_ids=prompt, params=params, salt=salt)
        with self._lock:
            if request_id in self._live:
                raise EngineInputError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
            self._pending.append(("add", seq))
        if self.kv_connector is not None:  # start fetching its prefix from the shared store
            self.kv_connector.prefetch(seq)

    def _check_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        if not isinstance(prompt_token_ids, (list, tuple)) or len(prompt_token_ids) == 0:
            raise EngineInputError("prompt must contain at least one token")
        prompt = list(prompt_token_ids)
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise EngineInputError(f"token id {t!r} is out of range [0, {self.vocab_size})")
        return prompt

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the next step (unknown ids are ignored)."""
        with self._lock:
            if request_id in self._live:
                self._pending.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        """Requests not reported finished, or a burst still to be applied (async scheduling: one
        queued before its sequences finished — a stop token — is drained by one more ``step()``)."""
        with self._lock:
            return bool(self._live) or self._inflight is not None

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        with self._lock:
            pending_adds = sum(1 for op, _ in self._pending if op == "add")
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + pending_adds,
            kv_usage=pool.usage() if pool.num_blocks else 0.0,
            num_blocks_total=pool.num_blocks,
            num_blocks_free=pool.num_free,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
        )

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Apply queued adds/aborts, schedule, run the model once, sample, and report.

        With async scheduling, a multi-step burst's tokens are reported by the next ``step()``, which
        first queues the following burst of the same sequences when nothing else waits (the host
        applies one burst while the GPU runs the next)."""
        if self._inflight is not None:
            return self._step_inflight()
        outputs = self._drain()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        steps = self._decode_steps(batch)
        if steps > 1:
            pending = self.runner.decode_steps_async(batch.seqs, steps)
            if self.async_scheduling:
                self._inflight = (batch.seqs, pending)
                return outputs
            return outputs + self._apply_steps(batch.seqs, pending.get())
        t0 = time.perf_counter()
        logits = self.runner.execute(batch.seqs, batch.num_new_tokens)
        sampling: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.kv.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(seq)
        result = self.sampler.sample(logits, sampling) if sampling else None
        self._observe(batch, t0)
        if result is None:
            return outputs
        for seq, tok, lp in zip(sampling, result.token_ids, result.logprobs, strict=True):
            reason = self._append_token(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self._output(seq, [tok], None if lp is None else [lp]))
        return outputs

    def _append_token(self, seq: Sequence, tok: int) -> str | None:
        """Record a generated token; returns the finish reason it causes, if any."""
        seq.output_token_ids.append(tok)
        self.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        return self._finish_reason(seq, tok)

    def _observe(self, batch, t0: float) -> None:
        """Tell the KV store's connector what computing this step's tokens cost (its fetch-or-recompute
        model); only steps with prefill tokens, timed to the end of the GPU work."""
        if self.kv_connector is None or all(n == 1 for n in batch.num_new_tokens):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.kv_connector.observe_prefill(batch.total_tokens, time.perf_counter() - t0)

    def _decode_steps(self, batch) -> int:
        """How many greedy decode steps this batch may run in one go, with no scheduling or sampling in
        between (1 = a normal step):
        every sequence decoding greedily past its first token, without logprobs, none within that
        many tokens of max_tokens, nobody waiting for a free slot, and KV blocks for all of them."""
        k = self.cfg.num_scheduler_steps
        if k < 2:
            return 1
        if len(self.scheduler.running) < self.cfg.max_num_seqs and (self.scheduler.waiting or self._pending):
            return 1  # admit newcomers at the next step
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            p = seq.params
            if n != 1 or not seq.output_token_ids or not p.greedy or p.logprobs:
                return 1
            k = min(k, p.max_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens + 1)
        # the scheduler reserved one new token each; reserve the rest
        return k if k >= 2 and self._reserve(batch.seqs, k) else 1

    def _reserve(self, seqs: list[Sequence], tokens: int) -> bool:
        """KV blocks for ``tokens`` more tokens past each sequence's computed ones; False at the first
        that does not fit (those before it keep theirs: freed with them)."""
        return all(self.kv.allocate(seq, tokens) for seq in seqs)

    def _step_inflight(self) -> list[RequestOutput]:
        """Queue the next burst of the in-flight burst's sequences if they may go on, then apply the
        in-flight burst's tokens (waiting for them while the GPU runs the next)."""
        seqs, pending = self._inflight
        steps = self._continue_steps(seqs, pending.steps)
        self._inflight = (
            (seqs, self.runner.decode_steps_async(seqs, steps, after=pending)) if steps > 1 else None
        )
        return self._apply_steps(seqs, pending.get())

    def _continue_steps(self, seqs: list[Sequence], ahead: int) -> int:
        """How many steps the burst after the in-flight one (``ahead`` tokens not applied yet) may
        run: ``_decode_steps``' rule with those tokens counted; 1 (stop) when a request or abort is
        queued, someone waits for a slot while one is free, a sequence finished, or KV is short.
        Unlike ``_decode_steps`` it does not stop at the nearest max_tokens: a sequence that reaches
        its own inside the burst rides along (``_accept`` drops what it computed past it) — a burst
        sized to the nearest finish would end every pipeline there."""
        if self._pending or (self.scheduler.waiting and len(self.scheduler.running) < self.cfg.max_num_seqs):
            return 1
        if len(self.scheduler.running) != len(seqs) or any(s.is_finished for s in seqs):
            return 1
        k, longest = self.cfg.num_scheduler_steps, 0
        for seq in seqs:
            longest = max(longest, seq.params.max_tokens - len(seq.output_token_ids) - ahead)
            k = min(k, self.max_model_len - seq.num_tokens - ahead + 1)  # positions stay in the model's range
        k = min(k, longest)  # k < 2 also when every sequence ends with the in-flight burst
        return k if k >= 2 and self._reserve(seqs, ahead + k) else 1

    def _apply_steps(self, seqs: list[Sequence], tokens: list[list[int]]) -> list[RequestOutput]:
        """Append each sequence's multi-step tokens up to its first stop; what a sequence generated
        past its stop is dropped (its KV lies beyond ``num_computed_tokens``, in blocks freed with it),
        as is a burst of a sequence that finished in the burst before it (async scheduling)."""
        outputs = []
        for seq, toks in zip(seqs, tokens, strict=True):
            if seq.is_finished:
                continue
            new, reason = self._accept(seq, toks)
            seq.num_computed_tokens += len(new)
            seq.output_token_ids.extend(new)
            self.generation_tokens += len(new)
            self.kv.commit(seq)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self._output(seq, new, None))
        return outputs

    def _accept(self, seq: Sequence, toks: list[int]) -> tuple[list[int], str | None]:
        """The tokens of a burst ``seq`` keeps — through the first that finishes it — and why it
        finishes (``_finish_reason`` token by token, without a call per token: a burst at batch 64 is
        512 tokens between two GPU bursts)."""
        p = seq.params
        eos = None if p.ignore_eos else self.eos_token_id
        stop = next((i for i, t in enumerate(toks) if t in p.stop_token_ids or t == eos), None)
        room = max(1, min(p.max_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens))
        if stop is not None and stop < room:
            return toks[: stop + 1], "stop"
        if room <= len(toks):
            return toks[:room], "length"
        return toks, None

    def _drain(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            ops = list(self._pending)
            self._pending.clear()
        for op, item in ops:
            if op == "add":
                seq = item
                self._seqs[seq.request_id] = seq
                self.prompt_tokens += seq.num_prompt_tokens
                self.scheduler.add(seq)
            else:
                seq = self._seqs.get(item)
                if seq is not None and not seq.is_finished:
                    self._finish(seq, "abort")
                    outputs.append(self._output(seq, [], None))
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if tok in p.stop_token_ids or (tok == self.eos_token_id and not p.ignore_eos):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]
        with self._lock:
            self._live.discard(seq.request_id)

    def _output(self, seq: Sequence, toks: list[int], lps: list[dict[int, float]] | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=toks,
            new_logprobs=lps,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    # -- convenience ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        salt: str | None = None,
        prefix: str = "gen",
    ) -> list[Completion]:
        """Run ``prompts`` to completion (all submitted at once) and return them in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"{prefix}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        start: dict[str, float] = {}
        got: dict[str, list[int]] = {i: [] for i in ids}
        lps: dict[str, list] = {i: [] for i in ids}
        done: dict[str, RequestOutput] = {}
        first: dict[str, float] = {}
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            start[rid] = time.monotonic()
            self.add_request(rid, prompt, p, salt=salt)
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in got:
                    continue
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = time.monotonic()
                got[out.request_id].extend(out.new_token_ids)
                if out.new_logprobs:
                    lps[out.request_id].extend(out.new_logprobs)
                if out.finished:
                    done[out.request_id] = out
        end = time.monotonic()
        return [
            Completion(
                rid,
                list(pr),
                got[rid],
                lps[rid] if p.logprobs else None,
                done[rid].finish_reason,
                done[rid].num_cached_tokens,
                first.get(rid, end) - start[rid],
                end - start[rid],
            )
            for rid, pr, p in zip(ids, prompts, plist, strict=True)
        ]


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def read_eos_token_id(path: str | os.PathLike[str]) -> int | None:
    """EOS id from config.json, generation_config.json, or tokenizer_config.json + tokenizer.json."""
    p = Path(path)
    for name in ("generation_config.json", "config.json"):
        f = p / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
    tc, tj = p / "tokenizer_config.json", p / "tokenizer.json"
    if tc.is_file() and tj.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            tok = json.loads(tj.read_text())
            for t in tok.get("added_tokens", []):
                if t.get("content") == eos:
                    return int(t["id"])
            vocab = (tok.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict) and eos in vocab:
                return int(vocab[eos])
    return None
