"""The registry: runs and artifacts in a real SQLite file, artifacts written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sidecar.registry import (
    DB_FILENAME,
    MANIFEST_NAME,
    ArtifactRecord,
    Registry,
    library_versions,
    sweep_stale_temporaries,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reg(tmp_path: Path):
    registry = Registry(tmp_path / "home")
    yield registry
    registry.close()


def temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.tmp-*"))


def run_python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO)


# -- database ------------------------------------------------------------------------------------


def test_db_is_real_sqlite_in_wal_mode(reg, tmp_path):
    db = tmp_path / "home" / DB_FILENAME
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"artifacts", "runs"} <= tables
    finally:
        conn.close()


def test_reopen_keeps_data(tmp_path):
    with Registry(tmp_path / "home") as first:
        run_id = first.start_run("train", {"lr": 1e-4})
    with Registry(tmp_path / "home") as second:
        assert second.get_run(run_id)["method"] == "train"


def test_newer_schema_is_refused(tmp_path):
    Registry(tmp_path / "home").close()
    conn = sqlite3.connect(tmp_path / "home" / DB_FILENAME)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Registry(tmp_path / "home")


def test_closed_registry_says_so(tmp_path):
    registry = Registry(tmp_path / "home")
    registry.close()
    registry.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        registry.list_runs()


# -- runs ----------------------------------------------------------------------------------------


def test_run_round_trip(reg):
    run_id = reg.start_run("train", {"model": "tiny", "epochs": 2})
    assert run_id.startswith("run-")
    run = reg.get_run(run_id)
    assert run["status"] == "running" and run["finished"] is None and run["error"] is None
    assert run["params"] == {"model": "tiny", "epochs": 2}

    reg.finish_run(run_id, "failed", error={"kind": "out_of_memory", "detail": "CUDA"}, artifacts=["a-1"])
    run = reg.get_run(run_id)
    assert run["status"] == "failed"
    assert run["error"] == {"kind": "out_of_memory", "detail": "CUDA"}
    assert run["artifacts"] == ["a-1"]
    assert run["finished"] >= run["started"]
    assert reg.get_run("run-nope") is None


def test_finish_run_validates(reg):
    run_id = reg.start_run("merge_lora", {})
    with pytest.raises(ValueError):
        reg.finish_run(run_id, "exploded")
    with pytest.raises(KeyError):
        reg.finish_run("run-missing", "succeeded")


def test_list_runs_newest_first(reg):
    ids = [reg.start_run("generate", {"i": i}) for i in range(5)]
    listed = [r["id"] for r in reg.list_runs()]
    assert listed == ids[::-1]
    assert len(reg.list_runs(limit=2)) == 2


def test_run_lists_its_artifacts(reg, tmp_path):
    run_id = reg.start_run("train", {})
    with reg.write_artifact("adapter", tmp_path / "out" / "a", run_id=run_id) as p:
        (p.path / "w.bin").write_bytes(b"w")
    reg.finish_run(run_id, "succeeded")
    assert reg.get_run(run_id)["artifacts"] == [p.record.id]


# -- write_artifact --------------------------------------------------------------------------------


def test_write_artifact_success(reg, tmp_path):
    dest = tmp_path / "out" / "adapter-1"
    payload = {"adapter_model.safetensors": os.urandom(3_000_000), "sub/config.json": b'{"r": 8}'}
    with reg.write_artifact("adapter", dest, params={"r": 8, "path": tmp_path}) as pending:
        assert pending.path.parent == dest.parent and pending.path.name.startswith(".adapter-1.tmp-")
        assert not dest.exists()
        for rel, data in payload.items():
            (pending.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (pending.path / rel).write_bytes(data)
        pending.metrics = {"loss": 0.5, "bad": float("nan")}
        pending.extra_manifest = {"base_model": {"id": "tiny", "sha256": "ab"}}

    record = pending.record
    assert isinstance(record, ArtifactRecord)
    assert dest.is_dir() and temporaries(dest.parent) == []
    assert record.path == str(dest) and record.kind == "adapter" and record.name == "adapter-1"
    assert record.id.startswith("adapter-") and len(record.id.split("-")[-1]) == 6

    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["id"] == record.id and manifest["kind"] == "adapter"
    assert manifest["params"] == {"r": 8, "path": str(tmp_path)}
    assert manifest["metrics"] == {"loss": 0.5, "bad": None}
    assert manifest["base_model"] == {"id": "tiny", "sha256": "ab"}
    assert manifest["versions"] == library_versions() and "msgspec" in manifest["versions"]
    assert manifest["parents"] == []
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == set(payload)
    for rel, data in payload.items():
        assert files[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert files[rel]["size"] == len(data)
    assert record.size_bytes == sum(len(d) for d in payload.values()) + (dest / MANIFEST_NAME).stat().st_size

    stored = reg.get_artifact(record.id)
    assert stored == record
    assert stored.to_dict()["metrics"] == {"loss": 0.5, "bad": None}
    assert json.dumps(stored.to_dict())



def test_a_digest_made_while_writing_is_used_unless_the_file_changed(reg, tmp_path):
    """record_digest spares the registry a second read of a big file (a quantization hashes its output
    as llama.cpp writes it); a file changed after the digest was recorded is hashed again."""
    vouched = "0" * 64  # not the bytes' digest: the manifest shows which one the registry took
    with reg.write_artifact("gguf", tmp_path / "kept") as pending:
        (pending.path / "model.gguf").write_bytes(b"weights")
        pending.record_digest(pending.path / "model.gguf", vouched)
    kept = {f["path"]: f["sha256"] for f in json.loads((tmp_path / "kept" / MANIFEST_NAME).read_text())["files"]}
    assert kept == {"model.gguf": vouched}

    with reg.write_artifact("gguf", tmp_path / "changed") as pending:
        (pending.path / "model.gguf").write_bytes(b"weights")
        pending.record_digest(pending.path / "model.gguf", vouched)
        with open(pending.path / "model.gguf", "ab") as handle:
            handle.write(b" and more")
    changed = {f["path"]: f["sha256"] for f in json.loads((tmp_path / "changed" / MANIFEST_NAME).read_text())["files"]}
    assert changed == {"model.gguf": hashlib.sha256(b"weights and more").hexdigest()}

@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_write_artifact_failure_leaves_nothing(reg, tmp_path, error):
    dest = tmp_path / "out" / "merged"
    with pytest.raises(type(error)):
        with reg.write_artifact("merged", dest) as pending:
            (pending.path / "half.safetensors").write_bytes(b"x" * 1000)
            raise error
    assert not dest.exists()
    assert temporaries(dest.parent) == []
    assert pending.record is None
    assert reg.list_artifacts() == []


def test_failed_index_takes_dest_away_again(reg, tmp_path, monkeypatch):
    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(reg, "_insert", locked)
    dest = tmp_path / "out" / "a"
    with pytest.raises(sqlite3.OperationalError):
        with reg.write_artifact("adapter", dest) as pending:
            (pending.path / "w").write_bytes(b"w")
    assert not dest.exists() and temporaries(dest.parent) == []


def test_dest_exists_refused_before_any_work(reg, tmp_path):
    dest = tmp_path / "out" / "taken"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("mine")
    entered = False
    with pytest.raises(FileExistsError):
        with reg.write_artifact("gguf", dest):
            entered = True
    assert not entered
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert temporaries(dest.parent) == []
    assert reg.list_artifacts() == []


def test_unknown_parent_refused_before_any_work(reg, tmp_path):
    with pytest.raises(KeyError, match="not-there"):
        with reg.write_artifact("merged", tmp_path / "out" / "m", parents=["not-there"]):
            pass
    assert not (tmp_path / "out").exists() or temporaries(tmp_path / "out") == []


def test_extra_manifest_cannot_override_core_fields(reg, tmp_path):
    dest = tmp_path / "out" / "x"
    with pytest.raises(ValueError, match="id"):
        with reg.write_artifact("report", dest) as pending:
            pending.extra_manifest = {"id": "forged"}
    assert not dest.exists() and temporaries(dest.parent) == []


def test_parents_and_lineage(reg, tmp_path):
    with reg.write_artifact("adapter", tmp_path / "adapter") as a:
        (a.path / "w").write_bytes(b"1")
    with reg.write_artifact("merged", tmp_path / "merged", parents=[a.record.id]) as m:
        (m.path / "w").write_bytes(b"2")
    with reg.write_artifact("gguf", tmp_path / "gguf", parents=[m.record.id]) as g:
        (g.path / "w").write_bytes(b"3")

    manifest = json.loads((tmp_path / "merged" / MANIFEST_NAME).read_text())
    (parent,) = manifest["parents"]
    assert parent["id"] == a.record.id and parent["path"] == str(tmp_path / "adapter")
    assert parent["manifest_sha256"] == hashlib.sha256((tmp_path / "adapter" / MANIFEST_NAME).read_bytes()).hexdigest()

    assert [r.id for r in reg.list_artifacts(parent=a.record.id)] == [m.record.id]
    assert [r.id for r in reg.list_artifacts()] == [g.record.id, m.record.id, a.record.id]
    assert [r.id for r in reg.list_artifacts(kind="merged")] == [m.record.id]
    assert len(reg.list_artifacts(limit=1)) == 1


def test_live_writer_survives_sweep(reg, tmp_path):
    dest = tmp_path / "out" / "slow"
    with reg.write_artifact("adapter", dest) as pending:
        (pending.path / "w").write_bytes(b"w")
        assert sweep_stale_temporaries(dest.parent, older_than_s=0) == 0
        assert pending.path.is_dir()
    assert (dest / "w").read_bytes() == b"w"


def test_sweep_respects_age(tmp_path):
    stale = tmp_path / ".model.tmp-deadbeef"
    stale.mkdir()
    (stale / "f").write_text("x")
    (tmp_path / ".stale-file.tmp-1").write_text("x")
    (tmp_path / "model").mkdir()  # not a temporary
    assert sweep_stale_temporaries(tmp_path) == 0
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(tmp_path / ".stale-file.tmp-1", (old, old))
    assert sweep_stale_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sweep_stale_temporaries(tmp_path / "missing") == 0


# -- other processes -------------------------------------------------------------------------------


WRITE_MANY = """
import sys
from pathlib import Path
from sidecar.registry import Registry
home, out, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with Registry(home) as reg:
    for i in range(20):
        with reg.write_artifact("adapter", out / f"{tag}-{i}", params={"i": i}) as p:
            (p.path / "w.bin").write_bytes(tag.encode() * 100)
"""


def test_two_processes_write_concurrently(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    procs = [run_python(WRITE_MANY, str(home), str(out), tag) for tag in ("p1", "p2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with Registry(home) as reg:
        records = reg.list_artifacts(limit=1000)
    assert len(records) == 40 and len({r.id for r in records}) == 40
    assert {Path(r.path).name for r in records} == {f"p{n}-{i}" for n in (1, 2) for i in range(20)}
    assert all((Path(r.path) / MANIFEST_NAME).is_file() for r in records)
    assert temporaries(out) == []


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from sidecar.registry import Registry
reg = Registry(Path(sys.argv[1]))
with reg.write_artifact("merged", Path(sys.argv[2])) as p:
    (p.path / "model.safetensors").write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_write_leaves_nothing_visible(tmp_path):
    home, dest = tmp_path / "home", tmp_path / "out" / "merged"
    proc = run_python(KILLED_MID_WRITE, str(home), str(dest))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not dest.exists()
    (leftover,) = temporaries(dest.parent)
    assert (leftover / "model.safetensors").is_file()

    assert sweep_stale_temporaries(dest.parent, older_than_s=0) == 1
    assert temporaries(dest.parent) == []
    with Registry(home) as reg:
        assert reg.list_artifacts() == []


# -- register_existing and delete -----------------------------------------------------------------


def test_register_existing_is_idempotent(reg, tmp_path):
    builtin = tmp_path / "builtin" / "tiny-llama"
    builtin.mkdir(parents=True)
    (builtin / "model.safetensors").write_bytes(b"m" * 123)
    first = reg.register_existing("model", builtin, artifact_id="builtin-tiny-llama", name="tiny")
    again = reg.register_existing("model", builtin, artifact_id="builtin-tiny-llama", name="other")
    assert first == again and first.name == "tiny" and first.size_bytes == 123
    assert reg.get_artifact("builtin-tiny-llama") == first

    no_id = reg.register_existing("dataset", builtin)
    assert reg.register_existing("dataset", builtin) == no_id
    assert len(reg.list_artifacts()) == 2


def test_register_existing_reads_manifest(tmp_path):
    home = tmp_path / "home"
    with Registry(home) as reg:
        with reg.write_artifact("adapter", tmp_path / "a", params={"r": 4}) as p:
            (p.path / "w").write_bytes(b"w")
            p.metrics = {"loss": 1.25}
        original = p.record
    (home / DB_FILENAME).unlink()  # the index is lost; the manifest is not
    for suffix in ("-wal", "-shm"):
        (home / (DB_FILENAME + suffix)).unlink(missing_ok=True)
    with Registry(home) as reg:
        rebuilt = reg.register_existing("adapter", tmp_path / "a")
    assert (rebuilt.id, rebuilt.params, rebuilt.metrics, rebuilt.created) == (
        original.id, {"r": 4}, {"loss": 1.25}, original.created
    )


def test_register_missing_path(reg, tmp_path):
    with pytest.raises(FileNotFoundError):
        reg.register_existing("model", tmp_path / "nope")


def test_delete_artifact(reg, tmp_path):
    with reg.write_artifact("gguf", tmp_path / "keep") as keep:
        (keep.path / "w").write_bytes(b"1")
    with reg.write_artifact("gguf", tmp_path / "drop") as drop:
        (drop.path / "w").write_bytes(b"2")

    assert reg.delete_artifact(keep.record.id) is True
    assert reg.get_artifact(keep.record.id) is None and (tmp_path / "keep").is_dir()

    assert reg.delete_artifact(drop.record.id, remove_files=True) is True
    assert not (tmp_path / "drop").exists() and temporaries(tmp_path) == []
    assert reg.delete_artifact(drop.record.id) is False
