"""``retort registry ...``: the script contracts (last stdout line of publish), readable tables,
exit 1 for a damaged version, exit 2 with one line for every bad input, --root over the env."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from cluster.config.model import preset
    from cluster.model import Transformer

    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    Transformer(preset("tiny")).init_weights(0).save_pretrained(d)
    return d


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    r = tmp_path / "reg"
    monkeypatch.setenv("RETORT_REGISTRY", str(r))
    return r


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["registry", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_publish_prints_ref_last_and_everything_reads_back(root, tiny_ckpt, tmp_path, capsys):
    lineage, metrics = tmp_path / "lineage.json", tmp_path / "metrics.json"
    lineage.write_text(json.dumps({"parents": ["teacher:1"], "dataset_fingerprint": "fp1"}))
    metrics.write_text(json.dumps({"perplexity": 21.5, "retention": 0.93}))
    rc, out, _ = run(
        capsys,
        "publish",
        str(tiny_ckpt),
        "--name",
        "student",
        "--lineage-json",
        str(lineage),
        "--metrics-json",
        str(metrics),
    )
    assert rc == 0 and out.splitlines()[-1] == "student:1"
    rc, out, err = run(capsys, "publish", str(tiny_ckpt), "--name", "student", "--alias", "production")
    assert rc == 0 and out.splitlines()[-1] == "student:2" and "student@production -> 2" in err

    rc, out, _ = run(capsys, "ls")
    assert rc == 0 and out.splitlines()[0].split() == [
        "NAME",
        "VERSIONS",
        "LATEST",
        "ALIASES",
        "ARCH",
        "PARAMS",
        "SIZE",
        "CREATED",
    ]
    assert out.splitlines()[1].split()[:4] == ["student", "2", "2", "production:2"]
    rc, out, _ = run(capsys, "ls", "student")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "ALIASES", "CREATED"] and len(lines) == 3
    assert "perplexity=21.5" in lines[1] and "teacher:1" in lines[1] and "production,latest" in lines[2]
    rc, out, _ = run(capsys, "ls", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["student:1", "student:2"]

    rc, out, _ = run(capsys, "show", "student:1")
    assert rc == 0 and "LlamaForCausalLM" in out and "fp1" in out and "model.safetensors" in out
    rc, out, _ = run(capsys, "show", "student@production", "--json")
    m = json.loads(out)
    assert (
        m["ref"] == "student:2"
        and m["aliases"] == ["production"]
        and set(m["files"]) == {"config.json", "model.safetensors"}
    )

    rc, out, _ = run(capsys, "promote", "student:1", "production")
    assert rc == 0 and out.strip() == "student@production -> 1 (was 2)"
    rc, out, _ = run(capsys, "verify", "student@production")
    assert rc == 0 and out.startswith("ok student:1: 2 files")
    rc, out, _ = run(capsys, "diff", "student:1", "student:2")
    assert rc == 0 and "identical files" in out and "perplexity" in out
    rc, out, _ = run(capsys, "diff", "student:1", "student:2", "--json")
    assert json.loads(out)["metrics"]["perplexity"] == {"a": 21.5, "b": None}
    rc, out, _ = run(capsys, "log", "student")
    assert rc == 0 and [ln.split()[2] for ln in out.splitlines()[1:]] == [
        "publish",
        "publish",
        "promote",
        "promote",
    ]


def test_damaged_version_exits_1_naming_the_file(root, tiny_ckpt, capsys):
    assert run(capsys, "publish", str(tiny_ckpt), "--name", "m")[0] == 0
    f = root / "m" / "versions" / "1" / "model.safetensors"
    os.chmod(f, 0o644)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    rc, out, err = run(capsys, "verify", "m:1")
    assert rc == 1 and "model.safetensors" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["show", "nope"], "no model 'nope'"),
        (["show", "m:5"], "versions: 1"),
        (["show", "m@prod"], "no alias 'prod'"),
        (["promote", "m:1", "latest"], "latest"),
        (["promote", "m:1", "Bad/Alias"], "invalid alias"),
        (["publish", "{ckpt}", "--name", "../x"], "invalid model name"),
        (["publish", "{ckpt}", "--name", "/abs"], "invalid model name"),
        (["publish", "{ckpt}", "--name", ""], "invalid model name"),
        (["publish", "{ckpt}", "--name", "m", "--alias", "latest!"], "invalid alias"),
        (["publish", "{ckpt}", "--name", "m", "--metrics-json", "/no/such.json"], "no such file"),
        (["publish", "{pickled}", "--name", "m"], "pytorch_model.bin"),
        (["publish", "{empty}", "--name", "m"], "no weights"),
        (["diff", "m:1", "m"], None),
    ],
)
def test_bad_input_exits_2_with_one_line(root, tiny_ckpt, tmp_path, capsys, argv, needle):
    assert run(capsys, "publish", str(tiny_ckpt), "--name", "m")[0] == 0
    pickled, empty = tmp_path / "pickled", tmp_path / "empty"
    shutil.copytree(tiny_ckpt, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    empty.mkdir()
    argv = [a.format(ckpt=tiny_ckpt, pickled=pickled, empty=empty) for a in argv]
    rc, out, err = run(capsys, *argv)
    if needle is None:  # a valid command for contrast
        assert rc == 0
        return
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in (root / "m" / "versions").iterdir()) == ["1"]  # nothing new written


def test_root_option_overrides_env_in_a_real_process(root, tiny_ckpt, tmp_path):
    other = tmp_path / "other"
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "registry",
        "publish",
        str(tiny_ckpt),
        "--name",
        "m",
        "--root",
        str(other),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "m:1"
    assert (other / "m" / "versions" / "1" / "manifest.json").is_file() and not root.exists()
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "registry", "ls", "--root", str(other)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.splitlines()[1].startswith("m ")
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, cluster.commands.registry, cluster.registry, cluster.registry.remote; print(' '.join(sys.modules))"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    ).stdout.split()  # fmt: skip


def test_unwritable_root_is_one_line(tiny_ckpt, tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    rc, out, err = run(capsys, "publish", str(tiny_ckpt), "--name", "m", "--root", str(not_a_dir))
    assert rc == 1 and "registry storage error: Not a directory" in err and len(err.strip().splitlines()) == 1
