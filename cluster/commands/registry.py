"""``retort registry ls | show | publish | promote | verify | diff | log``.

The root is ``--root`` > ``$RETORT_REGISTRY`` > ``~/.retort/registry``. ``publish`` prints the
new reference (``NAME:VERSION``) as its last stdout line, for scripts. Tables are plain aligned
text; ``--json`` gives the full records.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from cluster.errors import RetortError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list, inspect, publish, promote, verify and diff models")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root", help="registry root (path or s3://...); default $RETORT_REGISTRY or ~/.retort/registry"
    )
    common.add_argument("--cache-dir", help="local cache for remote roots (default ~/.retort/cache)")
    rs = p.add_subparsers(dest="registry_command", metavar="ACTION")

    ls = rs.add_parser("ls", parents=[common], help="list models, or the versions of one model")
    ls.add_argument("name", nargs="?", help="model name (default: every model, one line each)")
    ls.add_argument("--json", action="store_true", help="print JSON rows")
    ls.set_defaults(handler=cmd_ls)

    show = rs.add_parser("show", parents=[common], help="show the manifest of a version")
    show.add_argument("ref", help="NAME, NAME:VERSION or NAME@ALIAS")
    show.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    show.set_defaults(handler=cmd_show)

    pub = rs.add_parser("publish", parents=[common], help="publish a checkpoint directory as a new version")
    pub.add_argument("dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    pub.add_argument("--name", required=True, help="model name")
    pub.add_argument("--alias", help="also point this alias at the new version")
    pub.add_argument(
        "--lineage-json", help="JSON file: parents, dataset_fingerprint, tokenizer_sha256, config ..."
    )
    pub.add_argument("--metrics-json", help="JSON file: perplexity, retention, tokens_per_s ...")
    pub.set_defaults(handler=cmd_publish)

    pro = rs.add_parser("promote", parents=[common], help="point an alias at a version (atomic, audited)")
    pro.add_argument("ref", help="NAME:VERSION (or NAME@ALIAS / NAME for what it points to now)")
    pro.add_argument("alias", help="alias to move, e.g. production")
    pro.set_defaults(handler=cmd_promote)

    ver = rs.add_parser("verify", parents=[common], help="re-hash every stored file of a version")
    ver.add_argument("ref", help="NAME, NAME:VERSION or NAME@ALIAS")
    ver.set_defaults(handler=cmd_verify)

    dif = rs.add_parser("diff", parents=[common], help="compare two versions")
    dif.add_argument("a", help="reference")
    dif.add_argument("b", help="reference")
    dif.add_argument("--json", action="store_true", help="print the diff as JSON")
    dif.set_defaults(handler=cmd_diff)

    log = rs.add_parser("log", parents=[common], help="audit log of a model (publishes and alias moves)")
    log.add_argument("name", help="model name")
    log.add_argument("--json", action="store_true", help="print JSON lines")
    log.set_defaults(handler=cmd_log)

    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


# --- formatting ------------------------------------------------------------------------------


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if x < 1000 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    raise AssertionError


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def short_metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    items = [(k, v) for k, v in metrics.items() if k != "size_bytes" and isinstance(v, int | float | str)]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def _read_json_arg(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise RetortError(f"{what} {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RetortError(f"{what} {p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise RetortError(f"{what} {p}: must hold a JSON object")
    return data


def _open(args: argparse.Namespace):
    from cluster.registry import open_registry

    return open_registry(root=args.root, cache_dir=args.cache_dir)


# --- handlers --------------------------------------------------------------------------------


def storage_errors(fn):
    """An unreachable or unwritable root (no bucket, read-only folder) is one line, not a traceback."""

    @functools.wraps(fn)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise RetortError(f"registry storage error: {e.strerror or e}{where}", exit_code=1) from None

    return wrapped


@storage_errors
def cmd_ls(args: argparse.Namespace) -> int:
    reg = _open(args)
    rows = reg.list(args.name)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {reg.root}")
        return 0
    if args.name is None:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by.setdefault(r["name"], []).append(r)
        out = [
            [n, len(vs), vs[-1]["version"], " ".join(f"{a}:{v['version']}" for v in vs for a in v["aliases"] if a != "latest"),
             vs[-1]["architecture"], human_count(vs[-1]["num_parameters"]), human_bytes(vs[-1]["size_bytes"]), vs[-1]["created"]]
            for n, vs in by.items()
        ]  # fmt: skip
        print(table(out, ["NAME", "VERSIONS", "LATEST", "ALIASES", "ARCH", "PARAMS", "SIZE", "CREATED"]))
    else:
        out = [
            [r["version"], ",".join(r["aliases"]), r["created"], r["created_by"], human_count(r["num_parameters"]),
             human_bytes(r["size_bytes"]), r["quantization"], r["sparsity"], ",".join(r["parents"]), short_metrics(r["metrics"])]
            for r in rows
        ]  # fmt: skip
        print(
            table(
                out,
                [
                    "VERSION",
                    "ALIASES",
                    "CREATED",
                    "BY",
                    "PARAMS",
                    "SIZE",
                    "QUANT",
                    "SPARSITY",
                    "PARENTS",
                    "METRICS",
                ],
            )
        )
    return 0


@storage_errors
def cmd_show(args: argparse.Namespace) -> int:
    m = _open(args).show(args.ref)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    lin = m["lineage"]
    facts = [
        ["ref", m["ref"]],
        ["aliases", ", ".join(m["aliases"])],
        ["created", f"{m['created']} by {m['created_by']}"],
        ["format", m["format"]],
        ["architecture", f"{m.get('architecture')} ({m.get('model_type')})"],
        [
            "parameters",
            f"{m.get('num_parameters'):,} in {m.get('num_tensors')} tensors {m.get('elements_by_dtype')}",
        ],
        ["size", human_bytes(m["size_bytes"])],
        ["quantization", json.dumps(m.get("quantization")) if m.get("quantization") else None],
        ["pruning", json.dumps(m.get("pruning")) if m.get("pruning") else None],
        ["parents", ", ".join(lin.get("parents", []))],
        ["dataset", lin.get("dataset_fingerprint")],
        ["tokenizer", lin.get("tokenizer_sha256")],
        ["git commit", lin.get("git_commit")],
        ["ray job", lin.get("ray_job_id")],
    ]
    facts += [[f"metric {k}", v] for k, v in m.get("metrics", {}).items()]
    print(table(facts, ["FIELD", "VALUE"]))
    print()
    files = [[rel, human_bytes(f["size"]), f["sha256"]] for rel, f in m["files"].items()]
    print(table(files, ["FILE", "SIZE", "SHA256"]))
    return 0


@storage_errors
def cmd_publish(args: argparse.Namespace) -> int:
    from cluster.registry.refs import check_alias

    lineage = _read_json_arg(args.lineage_json, "--lineage-json")
    metrics = _read_json_arg(args.metrics_json, "--metrics-json")
    if args.alias is not None:
        check_alias(args.alias)
    reg = _open(args)
    ref = reg.publish(args.name, args.dir, lineage=lineage, metrics=metrics)
    m = reg.manifest(ref)
    print(
        f"published {ref} to {reg.root}: {len(m['files'])} files, {human_bytes(m['size_bytes'])}",
        file=sys.stderr,
    )
    if args.alias:
        reg.promote(ref.name, ref.version, args.alias)
        print(f"{ref.name}@{args.alias} -> {ref.version}", file=sys.stderr)
    print(ref)
    return 0


@storage_errors
def cmd_promote(args: argparse.Namespace) -> int:
    reg = _open(args)
    target = reg.ref(args.ref)
    entry = reg.promote(target.name, target.version, args.alias)
    was = f" (was {entry['from']})" if entry["from"] is not None else ""
    print(f"{target.name}@{args.alias} -> {target.version}{was}")
    return 0


@storage_errors
def cmd_verify(args: argparse.Namespace) -> int:
    reg = _open(args)
    ref = reg.ref(args.ref)
    reg.verify(ref)
    m = reg.manifest(ref)
    print(f"ok {ref}: {len(m['files'])} files, {human_bytes(m['size_bytes'])}, every sha256 matches")
    return 0


@storage_errors
def cmd_diff(args: argparse.Namespace) -> int:
    d = _open(args).diff(args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    f = d["files"]
    print(f"{d['a']} -> {d['b']}: " + ("identical files" if d["identical_files"] else
          f"{len(f['added'])} added, {len(f['removed'])} removed, {len(f['changed'])} changed, {len(f['unchanged'])} unchanged files"))  # fmt: skip
    rows = [["file", p, "-", "added"] for p in f["added"]] + [
        ["file", p, "removed", "-"] for p in f["removed"]
    ]
    rows += [["file", c["path"], c["a_sha256"][:12], c["b_sha256"][:12]] for c in f["changed"]]
    for section in ("summary", "config", "metrics", "lineage"):
        for k, rec in d[section].items():
            b = rec["b"] if "delta" not in rec else f"{rec['b']} ({rec['delta']:+.4g})"
            rows.append([section, k, _cell(rec["a"]), _cell(b)])
    if rows:
        print(table(rows, ["WHAT", "KEY", d["a"], d["b"]]))
    return 0


def _cell(v: Any, width: int = 60) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= width else s[: width - 3] + "..."


@storage_errors
def cmd_log(args: argparse.Namespace) -> int:
    entries = _open(args).audit(args.name)
    if args.json:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return 0
    rows = [
        [e["when"], e["who"], e["action"], e.get("alias"), e.get("from"), e.get("version")] for e in entries
    ]
    print(table(rows, ["WHEN", "WHO", "ACTION", "ALIAS", "FROM", "VERSION"]))
    return 0
