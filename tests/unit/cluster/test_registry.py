"""Registry core: publish/resolve round trip, manifest facts, file policy, refs, tamper detection,
aliases and audit, diff, root precedence, and the fsspec backend with its verified cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cluster.config.registry import RegistryConfig
from cluster.errors import RetortError
from cluster.registry import IntegrityError, ModelRef, RefError, open_registry, parse_ref
from cluster.registry.backend import STAGING, LocalBackend, rename_noreplace
from cluster.registry.manifest import safetensors_header, tensor_summary

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from cluster.config.model import preset
    from cluster.model import Transformer

    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    Transformer(preset("tiny")).init_weights(0).save_pretrained(d)
    (d / "README.md").write_text("# tiny\n")
    (d / "hyperparameters.yaml").write_text("lr: 0.001\n")
    return d


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(tiny_ckpt, d)
    return d


@pytest.fixture
def reg(tmp_path):
    return open_registry(root=str(tmp_path / "reg"))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def flip_byte(p: Path, offset: int = -100) -> None:
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[offset] ^= 0x01
    p.write_bytes(bytes(data))


def test_publish_resolve_round_trip(reg, ckpt, monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    r1 = reg.publish(
        "tiny", ckpt, lineage={"dataset_fingerprint": "abc", "stage": "teacher"}, metrics={"ppl": 12.5}
    )
    r2 = reg.publish("tiny", ckpt)
    assert (r1, r2) == (ModelRef("tiny", 1), ModelRef("tiny", 2)) and str(r2) == "tiny:2"
    path = reg.resolve("tiny:1")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [*(p.name for p in ckpt.iterdir()), "manifest.json"]
    )
    for f in ckpt.iterdir():
        assert sha(path / f.name) == sha(f)
    assert reg.resolve("tiny") == reg.resolve("tiny@latest") == reg.resolve("tiny:2")

    from cluster.model import Transformer

    m = reg.show("tiny:1")
    assert m["format"] == "hf" and m["architecture"] == "LlamaForCausalLM" and m["model_type"] == "llama"
    assert m["num_parameters"] == Transformer.from_pretrained(path).num_params()
    assert m["files"]["model.safetensors"] == {
        "sha256": sha(ckpt / "model.safetensors"),
        "size": (ckpt / "model.safetensors").stat().st_size,
    }
    assert m["size_bytes"] == sum(f.stat().st_size for f in ckpt.iterdir()) == m["metrics"]["size_bytes"]
    assert m["metrics"]["ppl"] == 12.5 and m["quantization"] is None and m["pruning"] is None
    lin = m["lineage"]
    assert (
        lin["dataset_fingerprint"] == "abc" and lin["stage"] == "teacher" and lin["ray_job_id"] == "02000000"
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert lin["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert "@" in m["created_by"] and m["created"].endswith("Z") and m["version"] == 1


def test_versions_are_immutable(reg, ckpt):
    reg.publish("tiny", ckpt)
    vdir = reg.resolve("tiny:1")
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in vdir.iterdir())
    assert all((p.stat().st_mode & 0o222) == 0 for p in vdir.iterdir())
    other = vdir.parent.parent.parent / STAGING / "other"
    other.mkdir(parents=True)
    (other / "x.json").write_text("{}")
    with pytest.raises(FileExistsError):
        rename_noreplace(other, vdir)
    empty = vdir.parent / "99"
    empty.mkdir()  # even an empty folder is never replaced
    with pytest.raises(FileExistsError):
        rename_noreplace(other, empty)
    reg.verify("tiny:1")


@pytest.mark.parametrize("bad", ["", "../x", "/abs", "a/b", "A", ".hidden", "x" * 65, "-x", "a b", "a\x00"])
def test_bad_names_refused_nothing_written(reg, ckpt, bad):
    with pytest.raises(RefError, match="invalid model name"):
        reg.publish(bad, ckpt)
    assert not Path(reg.root).exists()


def test_parse_ref():
    assert parse_ref("m") == parse_ref("m@latest") == parse_ref("m:latest")
    assert parse_ref("m:3").version == 3 and parse_ref("m@prod").alias == "prod"
    for bad in ["m:0", "m:x", "m@", "m@../p", "m@12", ":3", "@a", "m:-1"]:
        with pytest.raises(RefError):
            parse_ref(bad)


@pytest.mark.parametrize(
    "fname", ["pytorch_model.bin", "model.pt", "opt.pkl", "x.pth", "last.ckpt", "extra.py", "lib.so"]
)
def test_pickles_and_unknown_types_refused(reg, ckpt, fname):
    (ckpt / fname).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(RetortError, match=fname.replace(".", r"\.")) as e:
        reg.publish("tiny", ckpt)
    assert e.value.exit_code == 2
    assert not Path(reg.root).exists()


def test_bad_directories_refused(reg, ckpt, tmp_path):
    with pytest.raises(RetortError, match="metrics is not JSON"):
        reg.publish("tiny", ckpt, metrics={"bad": object()})
    with pytest.raises(RetortError, match="lineage.parents"):
        reg.publish("tiny", ckpt, lineage={"parents": [1]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetortError, match="no weights"):
        reg.publish("tiny", tmp_path / "empty")
    with pytest.raises(RetortError, match="not a directory"):
        reg.publish("tiny", tmp_path / "missing")
    (ckpt / "config.json").unlink()
    with pytest.raises(RetortError, match="no config.json"):
        reg.publish("tiny", ckpt)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(RetortError, match="not a safetensors file"):
        reg.publish("tiny", ckpt)
    assert not Path(reg.root).exists()


def test_sharded_index_must_name_present_shards(reg, ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00002.safetensors"}})
    )
    with pytest.raises(RetortError, match="model-00002.safetensors"):
        reg.publish("tiny", ckpt)


def test_republish_a_resolved_version(reg, ckpt, tmp_path):
    reg.publish("teacher", ckpt, metrics={"ppl": 5.0})
    copy = reg.publish("teacher-copy", reg.resolve("teacher:1"), lineage={"parents": ["teacher:1"]})
    m = reg.show(str(copy))
    assert "manifest.json" not in m["files"] and m["files"] == reg.show("teacher:1")["files"]
    assert m["metrics"] == {"size_bytes": m["size_bytes"]} and m["lineage"]["parents"] == ["teacher:1"]
    (ckpt / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(RetortError, match="reserved"):
        reg.publish("other", ckpt)


def test_header_parameter_count_matches_model(tiny_ckpt):
    from cluster.model import Transformer

    summary = tensor_summary([tiny_ckpt / "model.safetensors"])
    model = Transformer.from_pretrained(tiny_ckpt)
    assert summary["num_parameters"] == model.num_params()
    assert summary["num_tensors"] == len(model.state_dict())
    assert "__metadata__" in safetensors_header(tiny_ckpt / "model.safetensors")


def test_unknown_refs_list_what_exists(reg, ckpt):
    reg.publish("alpha", ckpt)
    reg.publish("alpha", ckpt)
    reg.publish("beta", ckpt)
    reg.promote("alpha", 1, "production")
    with pytest.raises(RefError, match=r"no model 'gamma' .*models: alpha, beta"):
        reg.resolve("gamma")
    with pytest.raises(RefError, match=r"alpha has no version 7; versions: 1-2"):
        reg.resolve("alpha:7")
    with pytest.raises(RefError, match=r"no alias 'staging'; aliases: @production -> 1"):
        reg.resolve("alpha@staging")
    with pytest.raises(RefError, match=r"versions: 1-2"):
        reg.promote("alpha", 9, "production")


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_flipped_byte_fails_resolve_and_verify(reg, ckpt, target):
    reg.publish("tiny", ckpt)
    reg.publish("tiny", ckpt)
    flip_byte(Path(reg.resolve("tiny:1")) / target, offset=-3)
    for op in (reg.resolve, reg.verify):
        with pytest.raises(IntegrityError, match=rf"tiny:1 .*file {target} sha256"):
            op("tiny:1")
    reg.verify("tiny:2")  # the other version is untouched


def test_missing_and_extra_files_fail_closed(reg, ckpt):
    reg.publish("tiny", ckpt)
    vdir = reg.resolve("tiny:1")
    (vdir / "sneaky.json").write_text("{}")
    with pytest.raises(IntegrityError, match="sneaky.json is not in the manifest"):
        reg.resolve("tiny:1")
    (vdir / "sneaky.json").unlink()
    (vdir / "README.md").unlink()
    with pytest.raises(IntegrityError, match="README.md is missing"):
        reg.verify("tiny:1")


def test_promote_moves_alias_and_appends_audit(reg, ckpt):
    for _ in range(3):
        reg.publish("tiny", ckpt)
    reg.promote("tiny", 1, "production")
    reg.promote("tiny", 3, "production")
    reg.promote("tiny", 2, "staging")
    assert reg.aliases("tiny") == {"production": 3, "staging": 2}
    assert reg.ref("tiny@production") == ModelRef("tiny", 3)
    moves = [(e["alias"], e["from"], e["to"]) for e in reg.audit("tiny") if e["action"] == "promote"]
    assert moves == [("production", None, 1), ("production", 1, 3), ("staging", None, 2)]
    assert all("@" in e["who"] and e["when"] for e in reg.audit("tiny"))
    assert [e["version"] for e in reg.audit("tiny") if e["action"] == "publish"] == [1, 2, 3]
    assert reg.show("tiny:3")["aliases"] == ["production"]
    with pytest.raises(RefError, match="latest"):
        reg.promote("tiny", 1, "latest")
    with pytest.raises(RefError, match="invalid alias"):
        reg.promote("tiny", 1, "../prod")


def test_quantization_and_pruning_recorded(reg, tmp_path):
    from cluster.config.model import preset
    from cluster.model import Transformer

    q = {
        "quant_method": "retort",
        "scheme": "int8",
        "group_size": None,
        "symmetric": True,
        "modules_not_converted": [],
    }
    d = tmp_path / "q"
    Transformer(preset("tiny")).save_pretrained(
        d, extra_config={"quantization_config": q, "pruning_config": {"sparsity": 0.5, "method": "wanda"}}
    )
    m = reg.show(str(reg.publish("q", d)))
    assert m["quantization"]["scheme"] == "int8" and m["quantization"]["method"] == "retort"
    assert m["pruning"] == {"sparsity": 0.5, "method": "wanda"}


def test_parents_are_pinned_to_versions(reg, ckpt):
    reg.publish("teacher", ckpt)
    reg.publish("teacher", ckpt)
    reg.promote("teacher", 1, "production")
    s = reg.publish(
        "student", ckpt, lineage={"parents": ["teacher@production", "teacher", "Qwen/Qwen2-0.5B"]}
    )
    assert reg.show(str(s))["lineage"]["parents"] == ["teacher:1", "teacher:2", "Qwen/Qwen2-0.5B"]
    assert reg.list("student")[0]["parents"] == ["teacher:1", "teacher:2", "Qwen/Qwen2-0.5B"]


def test_diff_reports_files_config_metrics_lineage(reg, ckpt, tmp_path):
    from cluster.config.model import preset
    from cluster.model import Transformer

    reg.publish("m", ckpt, lineage={"dataset_fingerprint": "d1"}, metrics={"ppl": 10.0})
    d2 = tmp_path / "v2"
    Transformer(preset("tiny", rope_theta=5000.0)).init_weights(1).save_pretrained(d2)
    (d2 / "tokenizer.json").write_text("{}")
    (d2 / "chat_template.jinja").write_text("{{ messages }}")
    reg.publish("m", d2, lineage={"dataset_fingerprint": "d2"}, metrics={"ppl": 8.0})
    d = reg.diff("m:1", "m:2")
    assert d["a"] == "m:1" and d["b"] == "m:2" and not d["identical_files"]
    assert d["files"]["added"] == ["chat_template.jinja", "tokenizer.json"]
    assert d["files"]["removed"] == ["README.md", "hyperparameters.yaml"]
    assert [c["path"] for c in d["files"]["changed"]] == ["config.json", "model.safetensors"]
    assert d["config"]["rope_theta"] == {"a": 10000.0, "b": 5000.0}
    assert d["metrics"]["ppl"]["delta"] == pytest.approx(-2.0)
    assert d["lineage"]["dataset_fingerprint"] == {"a": "d1", "b": "d2"}
    assert reg.diff("m:1", "m:1")["identical_files"]
    assert reg.show("m:2")["lineage"]["tokenizer_sha256"] == sha(
        d2 / "tokenizer.json"
    )  # filled when not given
    assert reg.show("m:1")["lineage"]["tokenizer_sha256"] is None


def test_list_rows(reg, ckpt):
    reg.publish("a", ckpt, metrics={"ppl": 3.0})
    reg.publish("a", ckpt)
    reg.publish("b", ckpt)
    reg.promote("a", 1, "production")
    rows = reg.list()
    assert [r["ref"] for r in rows] == ["a:1", "a:2", "b:1"]
    assert rows[0]["aliases"] == ["production"] and rows[1]["aliases"] == ["latest"]
    assert rows[0]["metrics"]["ppl"] == 3.0 and rows[0]["num_parameters"] > 0
    assert [r["ref"] for r in reg.list("b")] == ["b:1"]
    assert open_registry(root=str(Path(reg.root) / "nothing")).list() == []


def test_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETORT_REGISTRY", raising=False)
    assert open_registry().root == str(Path("~/.retort/registry").expanduser())
    cfg = RegistryConfig(root="rel/reg")
    assert open_registry(cfg).root == str(tmp_path / "rel/reg")
    monkeypatch.setenv("RETORT_REGISTRY", "~/env-reg")
    assert open_registry(cfg).root == str(Path("~/env-reg").expanduser())
    assert open_registry(cfg, root="file:///tmp/x").root == "/tmp/x"
    assert isinstance(open_registry(cfg, root="explicit").backend, LocalBackend)
    assert open_registry(cfg, root="explicit").root == str(tmp_path / "explicit")


def test_dead_publishers_staging_is_swept(reg, ckpt):
    reg.publish("tiny", ckpt)
    sdir = Path(reg.root) / STAGING
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = sdir / f"{uuid.uuid4().hex}+{dead.pid}+{os.uname().nodename}"
    live = sdir / f"{uuid.uuid4().hex}+{os.getpid()}+{os.uname().nodename}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    assert reg.publish("tiny", ckpt) == ModelRef("tiny", 2)
    assert not stale.exists() and live.exists()
    assert reg.backend.versions("tiny") == [1, 2]


# --- the fsspec backend (memory://, in process) ------------------------------------------------


@pytest.fixture
def mreg(tmp_path):
    root = f"memory://reg-{uuid.uuid4().hex[:8]}"
    return open_registry(root=root, cache_dir=str(tmp_path / "cache"))


def test_remote_publish_resolve_into_verified_cache(mreg, ckpt):
    assert mreg.publish("tiny", ckpt) == ModelRef("tiny", 1)
    assert mreg.publish("tiny", ckpt) == ModelRef("tiny", 2)
    path = mreg.resolve("tiny:1")
    assert str(path).startswith(str(mreg.backend.cache))
    for f in ckpt.iterdir():
        assert sha(path / f.name) == sha(f)
    mreg.promote("tiny", 1, "production")
    assert mreg.resolve("tiny@production") == path
    mreg.verify("tiny:2")
    assert [e["action"] for e in mreg.audit("tiny")] == ["publish", "publish", "promote"]
    assert mreg.backend.orphans("tiny") == []


def test_remote_damaged_cache_is_refetched(mreg, ckpt):
    mreg.publish("tiny", ckpt)
    path = mreg.resolve("tiny:1")
    flip_byte(path / "model.safetensors")
    assert mreg.resolve("tiny:1") == path
    assert sha(path / "model.safetensors") == sha(ckpt / "model.safetensors")


def test_remote_tampered_object_fails_closed(mreg, ckpt):
    mreg.publish("tiny", ckpt)
    be = mreg.backend
    obj = f"{be._data('tiny', be.read_manifest('tiny', 1))}/model.safetensors"
    data = bytearray(be.fs.cat_file(obj))
    data[-5] ^= 0xFF
    be.fs.pipe_file(obj, bytes(data))
    with pytest.raises(IntegrityError, match="file model.safetensors sha256"):
        mreg.verify("tiny:1")
    with pytest.raises(IntegrityError, match="file model.safetensors sha256"):
        mreg.resolve("tiny:1")
