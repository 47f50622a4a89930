"""Artifact registry: a SQLite index of runs and of the artifacts they wrote.

Artifacts (adapters, merged models, GGUF files, reports) are directories written to a hidden
temporary sibling and renamed into place only when complete, with a manifest.json inside saying
what produced them. The database only indexes them, so a lost database can be rebuilt from the
manifests (register_existing) and a crash never leaves a half-written artifact at its real path.

The sidecar and its worker processes open the same file at once: WAL mode lets readers run beside
one writer, busy_timeout makes writers wait for each other instead of failing, and every write is a
short BEGIN IMMEDIATE transaction. Open one Registry per process; never carry one across fork.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import functools
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

try:  # POSIX: a live writer holds a lock on its temporary directory so a sweep never removes it.
    import fcntl
except ImportError:  # pragma: no cover - Windows falls back to the age check alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ArtifactRecord",
    "DB_FILENAME",
    "MANIFEST_NAME",
    "PendingArtifact",
    "Registry",
    "RUN_STATUSES",
    "library_versions",
    "sweep_stale_temporaries",
]

DB_FILENAME = "registry.sqlite3"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
RUN_STATUSES = frozenset({"running", "succeeded", "failed", "cancelled"})
BUSY_TIMEOUT_S = 10.0
TEMP_MARKER = ".tmp-"
_TEMP_PATTERN = ".*.tmp-*"

# Libraries whose versions go into every manifest; looked up from metadata, never imported.
_VERSIONED_DISTRIBUTIONS = (
    "mlsidecar", "torch", "transformers", "peft", "safetensors",
    "gguf", "llama_cpp_python", "coremltools", "onnx", "onnxruntime", "onnxscript", "msgspec",
)

# One entry per schema version; a database at user_version N gets entries N.. applied in order.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            path TEXT NOT NULL,
            parents TEXT NOT NULL DEFAULT '[]',
            params TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            versions TEXT NOT NULL DEFAULT '{}',
            run_id TEXT,
            created REAL NOT NULL,
            size_bytes INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX artifacts_created ON artifacts (created DESC, id DESC)",
        "CREATE INDEX artifacts_kind_created ON artifacts (kind, created DESC, id DESC)",
        "CREATE INDEX artifacts_run ON artifacts (run_id)",
        "CREATE INDEX artifacts_path ON artifacts (path)",
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            method TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL,
            error TEXT,
            started REAL NOT NULL,
            finished REAL,
            artifacts TEXT NOT NULL DEFAULT '[]'
        )""",
        "CREATE INDEX runs_started ON runs (started DESC, id DESC)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_ARTIFACT_COLUMNS = "id, kind, name, path, parents, params, metrics, versions, run_id, created, size_bytes"
_RUN_COLUMNS = "id, method, params, status, error, started, finished, artifacts"


@dataclass(frozen=True)
class ArtifactRecord:
    """One indexed artifact, as stored in the registry."""

    id: str
    kind: str
    name: str
    path: str
    parents: list[str]
    params: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    run_id: str | None
    created: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PendingArtifact:
    """An artifact being written: files go under .path (the temporary directory), not under .dest."""

    id: str
    kind: str
    name: str
    path: Path
    dest: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    record: ArtifactRecord | None = None
    digests: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # path -> (size, mtime_ns, sha256)

    def record_digest(self, file: Path, sha256: str) -> None:
        """A file's sha256 made while it was written (a quantization hashes its output as it goes): the
        registry uses it instead of reading the file again, unless the file changed since."""
        stat = file.stat()
        self.digests[file.relative_to(self.path).as_posix()] = (stat.st_size, stat.st_mtime_ns, sha256)


# --------------------------------------------------------------------------------------------
# helpers


def _new_id(prefix: str) -> str:
    """Readable, unique enough, and sorting by time: '<prefix>-YYYYmmdd-HHMMSS-<6 hex>' (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def _id_prefix(kind: str) -> str:
    prefix = re.sub(r"[^A-Za-z0-9_.]+", "-", kind).strip("-.")
    return prefix or "artifact"


def _plain(value: Any) -> Any:
    """Make a value strict-JSON safe: NaN/inf become null (JSON.parse in Node rejects them), Paths become str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))


def _loads(text: str | None, default: Any) -> Any:
    return default if text is None else json.loads(text)


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    found = [("python", platform.python_version())]
    for dist in _VERSIONED_DISTRIBUTIONS:
        try:
            found.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(found)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, read once per process from package metadata."""
    return dict(_library_versions())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_and_sync(root: Path, known: dict[str, tuple[int, int, str]]) -> list[dict[str, Any]]:
    """sha256 and size of every file under root, each fsynced: the disk writes back (in a thread)
    while the digests are computed, which takes about as long again for a freshly written model.
    A digest in `known` is taken when the file's size and mtime are still the ones it was made for."""
    paths: list[Path] = []
    dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirs.append(Path(dirpath))
        paths += [Path(dirpath, f) for f in sorted(filenames) if Path(dirpath, f).relative_to(root).as_posix() != MANIFEST_NAME]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-fsync") as pool:
        synced = [pool.submit(_fsync_file, path) for path in paths]
        files = []
        for path in paths:
            relative, stat = path.relative_to(root).as_posix(), path.stat()
            size, mtime_ns, digest = known.get(relative, (None, None, None))
            if (size, mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                with open(path, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files.append({"path": relative, "size": stat.st_size, "sha256": digest})
        for future in synced:
            future.result()
    for directory in dirs:
        _fsync_dir(directory)
    return files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names
        if not os.path.islink(os.path.join(d, f))
    )


def _file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _temp_sibling(dest: Path, tag: str = "") -> Path:
    return dest.parent / f".{dest.name}{TEMP_MARKER}{tag}{secrets.token_hex(4)}"


def _lock_dir(path: Path) -> int | None:
    """Hold an exclusive flock on a directory for as long as the fd is open (the kernel drops it on death)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _is_locked(path: Path) -> bool:
    """True while a live writer holds the directory's lock (flock conflicts even within one process)."""
    if fcntl is None or path.is_symlink() or not path.is_dir():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def sweep_stale_temporaries(parent: Path, older_than_s: float = 3600) -> int:
    """Remove '.*.tmp-*' leftovers of writers that crashed; returns how many were removed.

    A temporary is kept while its writer still holds its lock (POSIX) or while it is younger than
    older_than_s, so a sweep from a second sidecar never pulls files from under a live job.
    """
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in entries:
        if not fnmatch.fnmatchcase(entry.name, _TEMP_PATTERN):
            continue
        path = Path(entry.path)
        try:
            if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        if _is_locked(path):
            continue
        _remove(path)
        if not os.path.lexists(path):
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# the registry


class RegistryUnavailable(Exception):
    """The registry file cannot be opened or written: every method that needs it fails with this, at once."""

    def __init__(self, db_path: Path, exc: BaseException) -> None:
        text = str(exc)
        full = "full" in text.lower() or getattr(exc, "errno", None) == errno.ENOSPC
        self.error_kind = "disk_full" if full else "registry_unavailable"
        hint = ("free disk space and retry" if full else
                "check that the home directory is writable and the file is an SQLite database "
                "(move a corrupt file aside; it is rebuilt empty), or start with another --home")
        super().__init__(f"the artifact registry {db_path} cannot be used ({type(exc).__name__}: {text}); {hint}")
        self.error_detail = {"path": str(db_path)}
        self.retryable = full


@contextmanager
def _registry_errors(db_path: Path) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise RegistryUnavailable(db_path, exc) from exc


class Registry:
    """Runs and artifacts in <home>/registry.sqlite3; one instance per process, one thread at a time."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home).expanduser()
        self.db_path = self.home / DB_FILENAME
        self._lock = threading.RLock()
        with _registry_errors(self.db_path):
            self.home.mkdir(parents=True, exist_ok=True)
            self._conn: sqlite3.Connection | None = self._connect()

    # -- connection and schema ----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; writes open their own BEGIN IMMEDIATE.
        conn = sqlite3.connect(
            self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._set_up(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL and schema, retried: switching to WAL answers 'locked' at once, without waiting for
        busy_timeout, when another process is opening the same new file at that moment."""
        deadline, delay = time.monotonic() + BUSY_TIMEOUT_S, 0.005
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")  # may stay 'delete' where WAL is unsupported
                self._migrate(conn)
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema up to date; re-reads the version under the write lock so two processes agree."""
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path} has schema version {version}, newer than this mlsidecar supports "
                    f"({SCHEMA_VERSION}); upgrade mlsidecar or point it at another home directory"
                )
            for target in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the registry is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; BEGIN IMMEDIATE takes the write lock up front so it cannot deadlock later."""
        with self._lock, _registry_errors(self.db_path):
            conn = self._db
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock, _registry_errors(self.db_path):
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------------------------

    def start_run(self, method: str, params: dict) -> str:
        run_id = _new_id("run")
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, method, params, status, started) VALUES (?, ?, ?, 'running', ?)",
                (run_id, method, _dumps(params or {}), time.time()),
            )
        return run_id

    def finish_run(
        self, run_id: str, status: str, error: dict | None = None, artifacts: Sequence[str] = ()
    ) -> None:
        """Close a run; artifacts written with this run_id are listed even if the caller did not name them."""
        if status not in RUN_STATUSES - {"running"}:
            raise ValueError(f"status must be one of succeeded, failed, cancelled, not {status!r}")
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise KeyError(f"no run {run_id!r} in the registry")
            linked = [r[0] for r in db.execute(
                "SELECT id FROM artifacts WHERE run_id = ? ORDER BY created, id", (run_id,)
            )]
            listed = list(dict.fromkeys([*artifacts, *linked]))
            db.execute(
                "UPDATE runs SET status = ?, error = ?, finished = ?, artifacts = ? WHERE id = ?",
                (status, None if error is None else _dumps(error), time.time(), _dumps(listed), run_id),
            )

    def get_run(self, run_id: str) -> dict | None:
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        return self._run_dict(rows[0]) if rows else None

    def list_runs(self, limit: int = 100) -> list[dict]:
        rows = self._read(
            f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started DESC, id DESC LIMIT ?", (int(limit),)
        )
        return [self._run_dict(r) for r in rows]

    @staticmethod
    def _run_dict(row: tuple) -> dict:
        run_id, method, params, status, error, started, finished, artifacts = row
        return {
            "id": run_id, "method": method, "params": _loads(params, {}), "status": status,
            "error": _loads(error, None), "started": started, "finished": finished,
            "artifacts": _loads(artifacts, []),
        }

    # -- artifacts ----------------------------------------------------------------------------

    def _unused_id(self, kind: str) -> str:
        while True:
            candidate = _new_id(_id_prefix(kind))
            if not self._read("SELECT 1 FROM artifacts WHERE id = ?", (candidate,)):
                return candidate

    @contextmanager
    def write_artifact(
        self,
        kind: str,
        dest: Path,
        *,
        name: str | None = None,
        params: dict | None = None,
        parents: Sequence[str] = (),
        run_id: str | None = None,
    ) -> Iterator[PendingArtifact]:
        """Write an artifact so that dest shows either nothing or the complete directory with its manifest.

        Raises FileExistsError (dest taken) or KeyError (unknown parent) before anything is created.
        """
        if not kind:
            raise ValueError("an artifact needs a kind")
        dest = Path(os.path.abspath(Path(dest).expanduser()))
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, f"{dest} already exists; choose another output path", str(dest))
        parent_info = self._parent_info(parents)
        artifact_id = self._unused_id(kind)
        dest.parent.mkdir(parents=True, exist_ok=True)

        temp = _temp_sibling(dest)
        temp.mkdir()
        lock_fd = _lock_dir(temp)
        pending = PendingArtifact(id=artifact_id, kind=kind, name=name or dest.name, path=temp, dest=dest)
        renamed = False
        try:
            yield pending
            record = self._finalize(pending, params or {}, parent_info, run_id)
            renamed = True
            self._insert(record)
            pending.record = record
        except BaseException:
            # Undo whatever got done; after the rename that means taking dest away again.
            if renamed:
                try:
                    os.rename(dest, temp)
                except OSError:
                    pass
            _remove(temp)
            raise
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    def _parent_info(self, parents: Sequence[str]) -> list[dict[str, Any]]:
        """Parents as the manifest records them: where they are and the hash of their own manifest."""
        info = []
        for parent_id in parents:
            record = self.get_artifact(parent_id)
            if record is None:
                raise KeyError(f"parent artifact {parent_id!r} is not in the registry")
            manifest = Path(record.path) / MANIFEST_NAME
            info.append({
                "id": record.id, "kind": record.kind, "path": record.path,
                "manifest_sha256": _file_sha256(manifest) if manifest.is_file() else None,
            })
        return info

    def _finalize(
        self, pending: PendingArtifact, params: dict, parents: list[dict[str, Any]], run_id: str | None
    ) -> ArtifactRecord:
        """Hash and fsync the files, write the manifest, rename into place; the row comes after."""
        temp, dest = pending.path, pending.dest
        if not temp.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the artifact's temporary directory disappeared", str(temp))
        files = _hash_and_sync(temp, pending.digests)
        created = time.time()
        versions = library_versions()
        manifest: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "id": pending.id,
            "kind": pending.kind,
            "name": pending.name,
            "created": created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "run_id": run_id,
            "parents": parents,
            "params": params,
            "metrics": pending.metrics,
            "versions": versions,
            "files": files,
        }
        clash = set(pending.extra_manifest) & set(manifest)
        if clash:
            raise ValueError(f"extra_manifest may not override {sorted(clash)}")
        manifest.update(pending.extra_manifest)
        text = json.dumps(_plain(manifest), indent=2, ensure_ascii=False) + "\n"
        with open(temp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(temp)

        try:
            os.rename(temp, dest)  # atomic; fails on an existing non-empty directory or a file
        except OSError as exc:
            if os.path.lexists(dest):
                message = f"{dest} appeared while the artifact was written; choose another output path"
                raise FileExistsError(errno.EEXIST, message, str(dest)) from exc
            raise
        _fsync_dir(dest.parent)
        size = sum(f["size"] for f in files) + len(text.encode("utf-8"))
        return ArtifactRecord(
            id=pending.id, kind=pending.kind, name=pending.name, path=str(dest),
            parents=[p["id"] for p in parents], params=_plain(params), metrics=_plain(pending.metrics),
            versions=versions, run_id=run_id, created=created, size_bytes=size,
        )

    def _insert(self, record: ArtifactRecord, *, or_ignore: bool = False) -> None:
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        with self._write() as db:
            db.execute(
                f"{verb} INTO artifacts ({_ARTIFACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id, record.kind, record.name, record.path, _dumps(record.parents),
                    _dumps(record.params), _dumps(record.metrics), _dumps(record.versions),
                    record.run_id, record.created, record.size_bytes,
                ),
            )

    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        rows = self._read(f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE id = ?", (artifact_id,))
        return self._record(rows[0]) if rows else None

    def list_artifacts(
        self, kind: str | None = None, limit: int = 100, parent: str | None = None
    ) -> list[ArtifactRecord]:
        """Newest first, optionally only one kind and/or only the children of one artifact."""
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if parent is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(artifacts.parents) WHERE value = ?)")
            args.append(parent)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts {clause} ORDER BY created DESC, id DESC LIMIT ?",
            (*args, int(limit)),
        )
        return [self._record(r) for r in rows]

    @staticmethod
    def _record(row: tuple) -> ArtifactRecord:
        aid, kind, name, path, parents, params, metrics, versions, run_id, created, size = row
        return ArtifactRecord(
            id=aid, kind=kind, name=name, path=path, parents=_loads(parents, []),
            params=_loads(params, {}), metrics=_loads(metrics, {}), versions=_loads(versions, {}),
            run_id=run_id, created=created, size_bytes=size,
        )

    def register_existing(
        self,
        kind: str,
        path: Path,
        *,
        artifact_id: str | None = None,
        name: str | None = None,
        params: dict | None = None,
        metrics: dict | None = None,
        parents: Sequence[str] = (),
    ) -> ArtifactRecord:
        """Index something already complete on disk (the built-in model, an artifact whose row was lost).

        Idempotent: the same id, or with no id the same kind and path, returns the existing record.
        Missing fields are taken from the directory's manifest.json when it has one.
        """
        path = Path(os.path.abspath(Path(path).expanduser()))
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"cannot register {path}: it does not exist", str(path))
        manifest: dict[str, Any] = {}
        if (path / MANIFEST_NAME).is_file():
            try:
                manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                manifest = {}
            if not isinstance(manifest, dict):
                manifest = {}
        artifact_id = artifact_id or manifest.get("id")
        if artifact_id is None:
            rows = self._read(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE kind = ? AND path = ? ORDER BY created LIMIT 1",
                (kind, str(path)),
            )
            if rows:
                return self._record(rows[0])
            artifact_id = self._unused_id(kind)
        existing = self.get_artifact(artifact_id)
        if existing is not None:
            return existing
        manifest_parents = [p["id"] if isinstance(p, dict) else p for p in manifest.get("parents", [])]
        record = ArtifactRecord(
            id=artifact_id, kind=kind, name=name or manifest.get("name") or path.name, path=str(path),
            parents=list(parents or manifest_parents),
            params=_plain(params if params is not None else manifest.get("params", {})),
            metrics=_plain(metrics if metrics is not None else manifest.get("metrics", {})),
            versions=manifest.get("versions") or library_versions(), run_id=manifest.get("run_id"),
            created=float(manifest.get("created") or time.time()), size_bytes=_tree_size(path),
        )
        self._insert(record, or_ignore=True)  # another process may have won the race; theirs stands
        stored = self.get_artifact(artifact_id)
        assert stored is not None
        return stored

    def delete_artifact(self, artifact_id: str, *, remove_files: bool = False) -> bool:
        """Drop the row (and optionally the files); False when there was no such artifact.

        Files are first renamed to a hidden temporary so the path never shows a half-deleted
        artifact; a crash midway leaves a temporary that sweep_stale_temporaries removes.
        """
        with self._write() as db:
            row = db.execute("SELECT path FROM artifacts WHERE id = ?", (artifact_id,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM artifacts WHERE id = ?", (artifact_id,))
        if remove_files:
            path = Path(row[0])
            if os.path.lexists(path):
                trash = _temp_sibling(path, "del-")
                try:
                    os.rename(path, trash)
                except FileNotFoundError:
                    return True
                _remove(trash)
        return True
