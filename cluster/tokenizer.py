"""The tokenizer: byte-level BPE trained with Hugging Face ``tokenizers``, saved as a HF tokenizer dir.

A saved directory holds ``tokenizer.json`` (the model), ``tokenizer_config.json`` (eos/pad tokens and
the chat template) and ``special_tokens_map.json``, so ``transformers.AutoTokenizer.from_pretrained(dir)``
loads it and produces the same ids. ``Tokenizer.sha256`` is the sha256 of the ``tokenizer.json`` bytes:
a model trained on these ids records it, and anything that serves the model can check it.

Byte-level BPE with no normalizer: every Unicode string maps to bytes and back, so
``decode(encode(text)) == text`` for any text (special tokens included; decoding keeps them).

Special tokens (ids 0-3 in a trained tokenizer)::

    <|endoftext|>   eos; also separates documents in token shards
    <|pad|>         padding
    <|im_start|>    ChatML turn start
    <|im_end|>      ChatML turn end (a chat reply stops here)

Chat template (ChatML, as Qwen2 uses it), rendered with Jinja exactly as ``transformers`` does::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      for every message
    <|im_start|>assistant\\n                         if add_generation_prompt

``load_tokenizer`` also reads other HF tokenizer directories (e.g. of a user's Llama/Qwen2
checkpoint): their own eos/pad tokens and chat template are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from cluster.errors import RetortError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
N_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = N_BYTE_SYMBOLS + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


def _token_content(tok: Any) -> str | None:
    """HF configs spell a special token as a string or as ``{"content": ...}``."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the HF tokenizer config around it (eos, pad, chat template)."""

    def __init__(self, backend: Any, config: dict[str, Any], sha256: str, path: Path | None = None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.config = config
        self.sha256 = sha256
        self.path = path
        self.eos_id = self._special_id("eos_token", EOS_TOKEN)
        self.pad_id = self._special_id("pad_token", PAD_TOKEN)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        tmpl = config.get("chat_template")
        self.chat_template: str | None = tmpl if isinstance(tmpl, str) else None

    def _special_id(self, key: str, fallback: str) -> int | None:
        name = _token_content(self.config.get(key)) or fallback
        return self.backend.token_to_id(name)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, sha256={self.sha256[:12]})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated reply: eos and, for chat, ``<|im_end|>`` when present."""
        ids = [self.eos_id, self.backend.token_to_id(IM_END)]
        return sorted({i for i in ids if i is not None})

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``. Special-token strings in it become their ids (chat prompts rely on it).

        ``add_special_tokens`` runs the tokenizer's post-processor (e.g. a Llama BOS); ours has none.
        """
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            raise _not_text([text]) from None

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        try:
            return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]
        except TypeError:
            raise _not_text(texts) from None

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like ``encode_batch`` but special-token strings are plain text (as tiktoken's
        ``encode_ordinary``): a corpus that contains ``<|endoftext|>`` cannot inject document breaks."""
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = True
        try:
            return self.encode_batch(texts)
        finally:
            self.backend.encode_special_tokens = previous

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> Any:
        if self.chat_template is None:
            where = f" at {self.path}" if self.path else ""
            raise RetortError(f"tokenizer{where} has no chat_template")
        # The same environment transformers uses (utils/chat_template_utils.py), so output matches.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` as text (tokenize it with ``encode``)."""
        if not isinstance(messages, list) or not messages:
            raise RetortError("messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise RetortError(f"messages[{i}] must be an object with string 'role' and 'content'")
        from jinja2.exceptions import TemplateError

        specials = {k: _token_content(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials
            )
        except TemplateError as e:
            raise RetortError(f"chat template failed: {e}") from None

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the HF tokenizer dir (each file replaced atomically); returns the dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _atomic_write(out / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        special_map = {
            k: self.config[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
            if self.config.get(k) is not None
        }
        _atomic_write(out / SPECIAL_MAP_FILE, json.dumps(special_map, indent=2) + "\n")
        self.sha256 = file_sha256(out / TOKENIZER_FILE)
        self.path = out
        return out


def _not_text(texts: Sequence[object]) -> RetortError:
    """Why ``tokenizers`` refused an input: not a str, or a lone surrogate (not encodable as UTF-8)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            return RetortError(f"cannot tokenize a {type(t).__name__}: text must be a string")
        for j, ch in enumerate(t):
            if "\ud800" <= ch <= "\udfff":
                where = f"text {i}, " if len(texts) > 1 else ""
                return RetortError(
                    f"text is not valid Unicode: lone surrogate U+{ord(ch):04X} at {where}position {j}"
                )
    return RetortError("text could not be tokenized")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a HF tokenizer dir (``tokenizer.json`` [+ ``tokenizer_config.json``, ``chat_template.jinja``])."""
    from tokenizers import Tokenizer as Backend

    d = Path(path).expanduser()
    tj = d / TOKENIZER_FILE
    if not tj.is_file():
        raise RetortError(f"{d}: no {TOKENIZER_FILE} (not a tokenizer directory)")
    raw = tj.read_bytes()
    try:
        backend = Backend.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers error type is not exported
        raise RetortError(f"{tj}: cannot load tokenizer ({e})") from None
    config: dict[str, Any] = {}
    cfg_path = d / CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RetortError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config.get("chat_template"), str) and (d / "chat_template.jinja").is_file():
        config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(backend, config, hashlib.sha256(raw).hexdigest(), d)


def hf_config() -> dict[str, Any]:
    """``tokenizer_config.json`` of a Retort-trained tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on ``texts`` and save it to ``out_dir``; deterministic for the same input.

    The vocab holds the 4 special tokens (ids 0-3), all 256 byte symbols, then merges up to
    ``vocab_size``; a small corpus may yield fewer merges (``Tokenizer.vocab_size`` is the truth).
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise RetortError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({N_BYTE_SYMBOLS} byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = False

    def non_empty() -> Iterable[str]:
        nonlocal seen
        for t in texts:
            if t:
                seen = True
                yield t

    backend.train_from_iterator(non_empty(), trainer, length=length)
    if not seen:
        raise RetortError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(backend, hf_config(), sha256="")
    tok.save(out_dir)
    return tok


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy a checkpoint's tokenizer files into another checkpoint directory, so every model
    directory (teacher, student, each compressed variant) is self-contained for serving."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied += 1
    if not copied:
        raise RetortError(f"{src}: no tokenizer files to copy")
    return copied
