"""Prompts for the load test: fixed, sampled from a corpus, or N shared prefixes x M suffixes.

The corpus is the Python standard library's own source (every machine has it, ~30 MB of real
text); ``Workload.next()`` returns ``(kind, payload)`` where kind is ``completions`` or ``chat``.
Every user gets its own ``random.Random(seed + user_index)``, so a run is reproducible.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CORPUS_FILES: list[Path] | None = None


def corpus_files() -> list[Path]:
    """The standard library's ``.py`` files (sorted, so sampling is reproducible)."""
    global _CORPUS_FILES
    if _CORPUS_FILES is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        _CORPUS_FILES = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return _CORPUS_FILES


def sample_words(rng: random.Random, n_words: int, files: Sequence[Path] | None = None) -> str:
    """``n_words`` consecutive whitespace-separated words from a random place of a random file."""
    files = files or corpus_files()
    for _ in range(20):
        words = files[rng.randrange(len(files))].read_text(errors="replace").split()
        if len(words) >= n_words:
            start = rng.randrange(len(words) - n_words + 1)
            return " ".join(words[start : start + n_words])
    raise RuntimeError(f"no corpus file has {n_words} words")


def shared_prefix_prompts(
    n_prefixes: int,
    n_suffixes: int,
    prefix_words: int,
    suffix_words: int,
    seed: int,
    suffixes: Sequence[str] = (),
) -> list[str]:
    """``n_prefixes * n_suffixes`` prompts; prompt ``i * n_suffixes + j`` = prefix i + suffix j."""
    rng = random.Random(seed)
    prefixes = [sample_words(rng, prefix_words) for _ in range(n_prefixes)]
    tails = list(suffixes)[:n_suffixes] or []
    while len(tails) < n_suffixes:
        tails.append(sample_words(rng, suffix_words))
    return [f"{p}\n{s}" for p in prefixes for s in tails]


class Workload:
    """Request bodies for one user, from the ``workload`` section of LoadTestConfig (as a dict)."""

    def __init__(self, cfg: dict[str, Any], model: str, user_index: int = 0) -> None:
        self.cfg, self.model = cfg, model
        self.rng = random.Random(int(cfg["seed"]) + user_index)
        self._i = user_index
        kind = cfg["kind"]
        if kind == "shared_prefix":
            self.pool = shared_prefix_prompts(
                cfg["n_prefixes"],
                cfg["n_suffixes"],
                cfg["prefix_words"],
                cfg["suffix_words"],
                int(cfg["seed"]),
            )
        elif kind == "fixed":
            self.pool = list(cfg["prompts"])
        elif kind == "corpus":
            self.pool = []
        else:
            raise ValueError(f"unknown workload kind {kind!r}")

    def prompt(self) -> str:
        if self.cfg["kind"] == "corpus":
            return sample_words(self.rng, int(self.cfg["prompt_words"]))
        if self.cfg["kind"] == "fixed":
            self._i += 1
            return self.pool[self._i % len(self.pool)]
        return self.pool[self.rng.randrange(len(self.pool))]

    def next(self) -> tuple[str, dict[str, Any]]:
        """``(route kind, JSON body)`` of the next request."""
        c = self.cfg
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": c["max_tokens"],
            "temperature": c["temperature"],
            "stream": c["stream"],
        }
        if c["ignore_eos"]:
            body["ignore_eos"] = True
        if c["stream"]:
            body["stream_options"] = {"include_usage": True}
        text = self.prompt()
        if self.rng.random() < c["chat_fraction"]:
            return "chat", {**body, "messages": [{"role": "user", "content": text}]}
        return "completions", {**body, "prompt": text}
