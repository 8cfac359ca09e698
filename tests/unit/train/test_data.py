"""Corpus -> tokenizer -> token shards: contents, reuse, fingerprints, splits, bad input, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from cluster.config.data import DataConfig
from cluster.errors import ConfigError, RetortError
from cluster.tokenizer import EOS_TOKEN, load_tokenizer
from train.data import load_manifest, load_split, prepare
from train.data import shards as shards_mod
from train.data.corpus import Document, list_files, read_corpus, split_documents, stdlib_root, val_score
from train.data.shards import token_dtype

REPO = Path(__file__).resolve().parents[3]


def make_corpus(root: Path, n: int = 12) -> Path:
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        body = f"def f{i}(x):\n    return x * {i}  # héllo 你好 🎉\n" * (5 + i)
        (d / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}.txt").write_text(body)
    (d / ".hidden.txt").write_text("hidden text must not be read\n")
    (d / "blob.bin").write_bytes(b"\x00\x01binary\x00" * 10)
    return d


def cfg_for(tmp_path: Path, sources: list[str], **kw) -> DataConfig:
    return DataConfig(sources=sources, out_dir=str(tmp_path / "out"), vocab_size=300, val_fraction=0.2, **kw)


def out_entries(tmp_path: Path) -> list[str]:
    out = tmp_path / "out"
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_prepare_writes_exact_shards(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    m = prepare(cfg_for(tmp_path, [str(corpus)]))
    assert m.dir == tmp_path / "out" / m.fingerprint[:16] and m.path.is_file()
    assert m.dtype == "uint16" and m.vocab_size <= 300 and set(m.n_tokens) == {"train", "val"}
    tok = load_tokenizer(m.tokenizer_dir)
    assert tok.sha256 == m.tokenizer_sha256 and tok.eos_id == m.eos_id == 0
    rows = [json.loads(x) for x in (m.dir / "documents.jsonl").read_text().splitlines()]
    names = {r["name"] for r in rows}
    assert len(rows) == 12 and not any("hidden" in n or "blob" in n for n in names)
    for split in ("train", "val"):
        tokens = load_split(m.dir, split)
        assert (
            isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == m.n_tokens[split]
        )
        docs = [r for r in rows if r["split"] == split]
        assert sum(r["n_tokens"] for r in docs) == len(tokens)
        assert int((tokens == m.eos_id).sum()) == len(docs)  # one eos after every document, none inside
        for r in docs:
            ids = tokens[r["offset"] : r["offset"] + r["n_tokens"]]
            assert ids[-1] == m.eos_id
            rel = r["name"].split("corpus/", 1)[1]
            assert tok.decode(ids[:-1].tolist()) == (corpus / rel).read_text()


def test_rerun_reuses_everything(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, [str(make_corpus(tmp_path))])
    m1 = prepare(cfg)
    stamp = (m1.dir / "train.bin").stat().st_mtime_ns
    t0 = time.perf_counter()
    m2 = prepare(cfg)
    assert time.perf_counter() - t0 < 1.0
    assert m2.fingerprint == m1.fingerprint and (m2.dir / "train.bin").stat().st_mtime_ns == stamp
    assert out_entries(tmp_path) == sorted([m1.dir.name, "tokenizers"])  # no temp dirs left behind


def test_fingerprint_tracks_inputs(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    base = prepare(cfg_for(tmp_path, [str(corpus)]))
    # A split change makes new shards but reuses the tokenizer (keyed by its own settings + files).
    other_split = prepare(cfg_for(tmp_path, [str(corpus)], seed=5))
    assert (
        other_split.fingerprint != base.fingerprint and other_split.tokenizer_sha256 == base.tokenizer_sha256
    )
    assert other_split.raw["stats"]["tokenizer_train_s"] is None
    assert len(list((tmp_path / "out" / "tokenizers").iterdir())) == 1
    # Changing a file's content changes everything.
    (corpus / "doc01.txt").write_text("changed text\n" * 30)
    changed = prepare(cfg_for(tmp_path, [str(corpus)]))
    assert changed.fingerprint not in (base.fingerprint, other_split.fingerprint)
    assert len(list((tmp_path / "out" / "tokenizers").iterdir())) == 2


def test_split_is_by_content_hash() -> None:
    docs = [Document(f"d{i}", f"text {i}".encode(), f"{i:064x}") for i in range(400)]
    split = split_documents(docs, 0.25, seed=3)
    val = {d.name for d in split["val"]}
    assert 60 < len(val) < 140  # ~100 expected
    assert val == {d.name for d in docs if val_score(d.digest, 3) < 0.25}
    # Other documents do not move a document: shuffle and drop half, the val members stay val.
    rest = docs[::-2]
    assert {d.name for d in split_documents(rest, 0.25, seed=3)["val"]} == val & {d.name for d in rest}
    assert {d.name for d in split_documents(docs, 0.25, seed=4)["val"]} != val
    # train is in seeded-hash order (not corpus order): any prefix is a uniform sample of documents
    train = split["train"]
    assert sorted(d.name for d in train) == sorted(d.name for d in docs if d.name not in val)
    assert [val_score(d.digest, 3) for d in train] == sorted(val_score(d.digest, 3) for d in train)
    assert [d.name for d in train] != [d.name for d in docs if d.name not in val]
    # Tiny corpora still get both splits; a single document cannot be split.
    two = split_documents(docs[:2], 0.01, seed=0)
    assert len(two["train"]) == len(two["val"]) == 1
    with pytest.raises(RetortError, match="at least 2"):
        split_documents(docs[:1], 0.1, seed=0)


def test_jsonl_and_glob_sources(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": f"document number {i} ✓", "id": i}) for i in range(10)) + "\n\n"
    )
    (tmp_path / "g1.md").write_text("# one\n")
    (tmp_path / "g2.md").write_text("# two\n")
    cfg = cfg_for(tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "*.md")], jsonl_text_field="body")
    docs, records = read_corpus(cfg)
    assert [d.name.rsplit("/", 1)[-1] for d in docs] == [f"a.jsonl:{i}" for i in range(1, 11)] + [
        "g1.md",
        "g2.md",
    ]
    assert docs[3].text == "document number 3 ✓" and len(records) == 3
    m = prepare(cfg)
    assert sum(m.n_tokens.values()) > 12
    capped, _ = read_corpus(cfg.model_copy(update={"max_docs": 4}))
    assert len(capped) == 4


def test_stdlib_listing() -> None:
    root = stdlib_root()
    full = list_files(DataConfig())
    no_tests = list_files(DataConfig(include_tests=False))
    assert all(f.path.suffix == ".py" and "site-packages" not in f.path.parts for f in full)
    assert any("test" in f.path.relative_to(root).parts for f in full)
    assert not any({"test", "tests", "idle_test"} & set(f.path.relative_to(root).parts) for f in no_tests)
    assert 0 < len(no_tests) < len(full) and full[0].name.startswith("stdlib/")
    docs, _ = read_corpus(DataConfig(max_bytes=200_000))
    assert 200_000 <= sum(d.nbytes for d in docs) < 200_000 + max(d.nbytes for d in docs)


def test_token_dtype() -> None:
    assert token_dtype(512) == "uint16" and token_dtype(65535) == "uint16" and token_dtype(65536) == "uint32"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: [str(p / "missing")], "no such file or directory"),
        (lambda p: [str(p / "nothing*.txt")], "no text files match"),
        (lambda p: [str(_write(p / "empty.txt", ""))], "yielded no text"),
        (lambda p: ["stdlib", str(_write(p / "blank.txt", "  \n\n"))], "blank.txt.*no text"),
        (lambda p: [str(_mkdir(p / "emptydir"))], "no text files in this directory"),
        (lambda p: [str(_write(p / "x.jsonl", '{"content": "a"}\n'))], r"x.jsonl:1: no field 'text'"),
        (lambda p: [str(_write(p / "y.jsonl", '{"text": "a"}\n{oops\n'))], r"y.jsonl:2: invalid JSON"),
        (lambda p: [str(_write(p / "z.jsonl", '{"text": 5}\n'))], "not a string"),
        (lambda p: [str(_write(p / "one.txt", "only one document"))], "at least 2"),
    ],
)
def test_bad_corpus_is_one_clear_error(tmp_path: Path, setup, message: str) -> None:
    cfg = cfg_for(tmp_path, setup(tmp_path))
    with pytest.raises(RetortError, match=message) as info:
        prepare(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or out_entries(tmp_path) in ([], ["tokenizers"])


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def test_bad_config_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        load_config(None, DataConfig, ["vocab_size=100"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, DataConfig, ["val_fraction=0.9"])
    with pytest.raises(ConfigError, match="unknown field 'vocab'"):
        load_config(None, DataConfig, ["vocab=512"])


def test_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(tmp_path, [str(make_corpus(tmp_path))])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shards_mod, "write_split", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg)
    assert out_entries(tmp_path) == ["tokenizers"]  # the tokenizer was finished and cached; no shard dir
    monkeypatch.undo()
    m = prepare(cfg)
    assert load_manifest(m.dir).n_tokens == m.n_tokens


def test_damaged_dir_is_rebuilt(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, [str(make_corpus(tmp_path))])
    m = prepare(cfg)
    (m.dir / "val.bin").write_bytes(b"\x00")
    with pytest.raises(RetortError, match="truncated"):
        load_split(m.dir, "val")
    again = prepare(cfg)
    assert len(load_split(again.dir, "val")) == m.n_tokens["val"]
    with pytest.raises(RetortError, match="no split 'test'"):
        load_split(again.dir, "test")
    with pytest.raises(RetortError, match="not a prepared data dir"):
        load_manifest(tmp_path)


def test_special_token_text_is_not_a_document_break(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"s{i}.txt").write_text(f"before {EOS_TOKEN} after {i}\n" * 3)
    m = prepare(cfg_for(tmp_path, [str(tmp_path / "s*.txt")]))
    tokens = np.concatenate([load_split(m.dir, s) for s in ("train", "val")])
    assert int((tokens == m.eos_id).sum()) == 4


def test_cli_local_prints_manifest_path_last(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "data",
        "-c",
        "configs/data/tiny.yaml",
        f"out_dir={tmp_path}",
        "--local",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == "manifest.json" and path.parent.parent == tmp_path
    m = load_manifest(path)
    assert m.vocab_size == 512 and m.n_tokens["train"] > 100_000 and m.n_tokens["val"] > 10_000
    bad = subprocess.run(
        [*cmd[:-2], f"out_dir={tmp_path}", "sources=[/no/such/dir]", "--local"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("source '/no/such/dir': no such file or directory")


def test_concurrent_prepares_agree(tmp_path: Path) -> None:
    """Two processes preparing the same data at once: both succeed on one dir, no temp dirs left."""
    corpus = make_corpus(tmp_path, n=30)
    code = (
        "import sys; from cluster.config.data import DataConfig; from train.data import prepare; "
        f"m = prepare(DataConfig(sources=[{str(corpus)!r}], out_dir={str(tmp_path / 'out')!r}, "
        "vocab_size=300, val_fraction=0.2)); print(m.fingerprint, m.tokenizer_sha256)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert outs[0][0] == outs[1][0]
    fp = outs[0][0].split()[0]
    assert out_entries(tmp_path) == sorted([fp[:16], "tokenizers"])
    assert [p.name for p in (tmp_path / "out" / "tokenizers").iterdir()] != []
    assert not list((tmp_path / "out" / "tokenizers").glob(".*"))


def test_stale_temp_dirs_are_cleaned(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, [str(make_corpus(tmp_path))])
    m = prepare(cfg)
    shutil.rmtree(m.dir)
    old, fresh = tmp_path / "out" / f".tmp-{m.dir.name}-dead", tmp_path / "out" / f".tmp-{m.dir.name}-live"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    prepare(cfg)
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a running builder
