import os
import subprocess
import sys
from pathlib import Path

from serve.engine.hashing import ROOT_PARENT, block_hashes, hash_block

REPO = Path(__file__).resolve().parents[3]
TOKS = list(range(100, 150))


def test_chain_full_blocks_only_and_incremental():
    full = block_hashes(TOKS, 16, "m")
    assert len(full) == 3 and all(len(h) == 32 for h in full)
    head = block_hashes(TOKS[:33], 16, "m")
    assert head == full[:2]
    assert block_hashes(TOKS, 16, "m", start=2, parent=full[1]) == full[2:]


def test_prefix_chaining_and_extra_keys():
    a = block_hashes(TOKS, 16, "m")
    changed_first = block_hashes([7] + TOKS[1:], 16, "m")
    assert all(x != y for x, y in zip(a, changed_first, strict=False))  # a change propagates down the chain
    changed_last = block_hashes(TOKS[:40] + [7] + TOKS[41:], 16, "m")
    assert a[:2] == changed_last[:2] and a[2] != changed_last[2]
    assert block_hashes(TOKS, 16, "m", salt="tenant-a")[0] != a[0]
    assert block_hashes(TOKS, 16, "m", salt="tenant-a") != block_hashes(TOKS, 16, "m", salt="tenant-b")
    assert block_hashes(TOKS, 16, "m", salt="") != a  # empty salt is not "no salt"
    assert block_hashes(TOKS, 16, "other-model") != a
    assert hash_block(ROOT_PARENT, [1, 2]) != hash_block(ROOT_PARENT, [2, 1])


def test_identical_across_processes():
    code = (
        "from serve.engine.hashing import block_hashes;"
        f"print(','.join(h.hex() for h in block_hashes({TOKS!r}, 16, 'model-x', salt='s')))"
    )
    outs = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO
        )
        outs.add(r.stdout.strip())
    here = ",".join(h.hex() for h in block_hashes(TOKS, 16, "model-x", salt="s"))
    assert outs == {here}
