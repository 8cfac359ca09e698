"""Byte-level BPE tokenizer: exact round trips, HF compatibility, chat template, bad input."""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import pytest

from cluster.errors import RetortError
from cluster.tokenizer import (
    CHATML_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    load_tokenizer,
    train_tokenizer,
)

# Code point ranges the random texts draw from: ASCII, controls, Latin-1, combining marks,
# Cyrillic, CJK, Hangul, emoji, private use, the supplementary planes; never surrogates.
RANGES = [
    (0x20, 0x7E),
    (0x00, 0x1F),
    (0x7F, 0xFF),
    (0x300, 0x36F),
    (0x400, 0x4FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1F6FF),
    (0xE000, 0xF8FF),
    (0xFE00, 0xFFFF),
    (0x10000, 0x10FFFF),
]
PIECES = [" ", "  ", "\n", "\r\n", "\t", EOS_TOKEN, IM_START, "<|", "|>", "👩‍👩‍👧", "é", "e\u0301", "\ufeff"]


def random_text(rng: random.Random, max_len: int = 60) -> str:
    out = []
    for _ in range(rng.randint(0, max_len)):
        if rng.random() < 0.15:
            out.append(rng.choice(PIECES))
        else:
            lo, hi = rng.choice(RANGES)
            cp = rng.randint(lo, hi)
            out.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD))
    return "".join(out)


def corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = ["textwrap.py", "string.py", "colorsys.py", "bisect.py", "keyword.py"]
    texts = [(root / f).read_text(encoding="utf-8") for f in files]
    return texts + ["héllo wörld 你好世界 🎉 こんにちは мир\n" * 20]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), 400, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_saved_files_and_special_ids(tok, tok_dir: Path) -> None:
    assert {p.name for p in tok_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2, 3]
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.stop_ids == [0, 3]
    assert tok.sha256 == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML_TEMPLATE and cfg["eos_token"] == EOS_TOKEN


def test_round_trip_random_unicode(tok) -> None:
    rng = random.Random(1234)
    texts = (
        [random_text(rng) for _ in range(400)]
        + [random_text(rng, 2000) for _ in range(10)]
        + ["", " ", EOS_TOKEN]
    )
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids == tok.encode(text)
    for text, ids in zip(texts, tok.encode_ordinary_batch(texts), strict=True):
        assert tok.decode(ids) == text


def test_round_trip_real_code(tok) -> None:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) * 0.8  # merges learned on code compress it


def test_special_tokens_in_text(tok) -> None:
    text = f"a{EOS_TOKEN}b"
    assert tok.eos_id in tok.encode(text)
    ordinary = tok.encode_ordinary_batch([text])[0]
    assert tok.eos_id not in ordinary and tok.decode(ordinary) == text
    assert tok.encode(text) == tok.encode(text)  # the ordinary mode does not stick
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "ab"


def test_transformers_gives_identical_ids(tok, hf) -> None:
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    rng = random.Random(7)
    for text in [random_text(rng) for _ in range(200)] + corpus()[:2]:
        ids = tok.encode(text)
        assert hf.encode(text) == ids, repr(text)
        assert hf.decode(ids) == text


def test_chat_template_matches_transformers(tok, hf) -> None:
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2? 🤔\nanswer"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "  spaces  "},
        ],
    ]
    for messages in conversations:
        for gen in (False, True):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(ours) == hf.encode(ours)
    text = tok.apply_chat_template(conversations[0], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id(IM_START) and ids.count(tok.token_to_id(IM_END)) == 1


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"])
def test_bad_messages(tok, messages) -> None:
    with pytest.raises(RetortError, match="messages"):
        tok.apply_chat_template(messages)


def test_training_is_deterministic(tmp_path: Path, tok) -> None:
    again = train_tokenizer(corpus(), 400, tmp_path / "again")
    assert again.sha256 == tok.sha256


def test_small_corpus_gives_fewer_merges(tmp_path: Path) -> None:
    t = train_tokenizer(["abab abab"], 5000, tmp_path)
    assert 260 <= t.vocab_size < 5000
    assert t.decode(t.encode("¿qué? 🐍")) == "¿qué? 🐍"  # every byte is still in the alphabet


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(RetortError, match="vocab_size 100 is too small"):
        train_tokenizer(["abc"], 100, tmp_path / "a")
    with pytest.raises(RetortError, match="empty corpus"):
        train_tokenizer(["", ""], 300, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(RetortError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(RetortError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "bad")


def test_no_chat_template(tmp_path: Path, tok_dir: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    t = load_tokenizer(d)
    assert t.eos_id == 0 and t.pad_id == 1  # our token names are the fallback
    with pytest.raises(RetortError, match="no chat_template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_text_that_is_not_unicode(tok) -> None:
    with pytest.raises(RetortError, match=r"lone surrogate U\+D800 at position 1"):
        tok.encode("a\ud800b")
    with pytest.raises(RetortError, match=r"lone surrogate U\+DFFF at text 1, position 0"):
        tok.encode_batch(["ok", "\udfff"])
    with pytest.raises(RetortError, match="must be a string"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
