"""The run ledger: one SQLite file (standard library) that records every training run.

A run is keyed by `run_id`, a hash of its full configuration (`arbiter.train.TrainConfig`),
so a repeated sweep finds its finished runs and skips them. Tables:

    runs    one row per run: framework and versions, settings JSON, seed, dataset name
            and md5, code version, determinism switches, status, final metrics, wall time
    epochs  one row per (run, epoch): train/val loss and accuracy, learning rate, time

Status: running -> finished | failed | interrupted. A run killed with SIGKILL cannot say
so; its row stays 'running' with the pid that owned it, and `stale()` recognises it.

Every write is one transaction (`with conn:` commits or rolls back as a whole) and the
database runs in WAL mode, so a process killed at any moment leaves either the old row
or the new one, never half of one; readers (`arbiter runs`) never block the writer.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_DB = Path("runs") / "arbiter.db"
STATUSES = ("running", "finished", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    framework     TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    settings      TEXT NOT NULL,           -- the full TrainConfig as JSON
    dataset       TEXT NOT NULL,
    dataset_md5   TEXT NOT NULL,
    synthetic     INTEGER NOT NULL,
    versions      TEXT NOT NULL,           -- {package: version}
    determinism   TEXT NOT NULL,           -- which switches were on
    device        TEXT NOT NULL,
    code_version  TEXT NOT NULL,
    run_dir       TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
    attempts      INTEGER NOT NULL DEFAULT 1,
    pid           INTEGER,
    host          TEXT,
    started_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    finished_at   REAL,
    wall_time_s   REAL,                    -- training + evaluation time over all attempts
    epochs_done   INTEGER NOT NULL DEFAULT 0,
    best_epoch    INTEGER,
    val_loss      REAL,
    val_acc       REAL,
    test_acc      REAL,
    test_auc      REAL,
    final         TEXT,                    -- final metrics JSON (confusion matrix, ...)
    error         TEXT,
    -- a finished row carries its metrics; anything else carries none
    CHECK ((status = 'finished') = (test_acc IS NOT NULL AND test_auc IS NOT NULL AND final IS NOT NULL))
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id      TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL,          -- 1-based
    train_loss  REAL NOT NULL,
    train_acc   REAL NOT NULL,
    val_loss    REAL NOT NULL,
    val_acc     REAL NOT NULL,
    lr          REAL NOT NULL,             -- learning rate in effect during this epoch
    seconds     REAL NOT NULL,             -- training + validation time of this epoch
    train_seconds REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
"""


@dataclass
class RunRow:
    run_id: str
    framework: str
    seed: int
    settings: dict
    dataset: str
    dataset_md5: str
    synthetic: bool
    versions: dict
    determinism: dict
    device: str
    code_version: str
    run_dir: str
    status: str
    attempts: int
    pid: int | None
    host: str | None
    started_at: float
    updated_at: float
    finished_at: float | None
    wall_time_s: float | None
    epochs_done: int
    best_epoch: int | None
    val_loss: float | None
    val_acc: float | None
    test_acc: float | None
    test_auc: float | None
    final: dict | None
    error: str | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_JSON_COLUMNS = ("settings", "versions", "determinism", "final")


def _row(r: sqlite3.Row) -> RunRow:
    d = dict(r)
    for c in _JSON_COLUMNS:
        d[c] = json.loads(d[c]) if d[c] is not None else None
    d["synthetic"] = bool(d["synthetic"])
    return RunRow(**d)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent has not reaped it yet still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Ledger:
    """A connection to the ledger file; create one per process."""

    def __init__(self, path: str | Path = DEFAULT_DB):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE takes the
        # write lock up front, so two writers queue instead of failing mid-transaction)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(_SCHEMA)  # idempotent; executescript runs in its own transaction

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- reading ----------------------------------------------------------------------
    def get(self, run_id: str) -> RunRow | None:
        r = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _row(r) if r else None

    def runs(self, status: str | None = None, run_ids: list[str] | None = None) -> list[RunRow]:
        sql, params = "SELECT * FROM runs", []
        where = []
        if status:
            where.append("status = ?")
            params.append(status)
        if run_ids is not None:
            where.append(f"run_id IN ({','.join('?' * len(run_ids))})")
            params.extend(run_ids)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at"
        return [_row(r) for r in self.conn.execute(sql, params)]

    def epochs(self, run_id: str) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [dict(r) for r in rows]

    def stale(self, row: RunRow) -> bool:
        """A 'running' row whose process is gone (killed without a chance to say so)."""
        return row.status == "running" and (row.host != socket.gethostname() or not pid_alive(row.pid))

    # -- writing ----------------------------------------------------------------------
    def start(self, run_id: str, *, framework: str, seed: int, settings: dict, dataset: str, dataset_md5: str,
              synthetic: bool, versions: dict, determinism: dict, device: str, code_version: str, run_dir: str,
              resume_epochs: int = 0) -> RunRow:
        """Mark a run 'running' for this process: insert it, or take over an unfinished row
        (its epoch rows past `resume_epochs` are dropped: they will be recomputed)."""
        now = time.time()
        values = dict(framework=framework, seed=seed, settings=json.dumps(settings, sort_keys=True), dataset=dataset,
                      dataset_md5=dataset_md5, synthetic=int(synthetic), versions=json.dumps(versions, sort_keys=True),
                      determinism=json.dumps(determinism, sort_keys=True), device=device, code_version=code_version,
                      run_dir=run_dir, pid=os.getpid(), host=socket.gethostname(), updated_at=now)
        with self.transaction() as c:
            old = c.execute("SELECT status, pid, host FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if old is None:
                cols = ["run_id", "status", "started_at", *values]
                c.execute(
                    f"INSERT INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                    (run_id, "running", now, *values.values()),
                )
            else:
                if old["status"] == "finished":
                    raise RuntimeError(f"run {run_id} is already finished")
                if old["status"] == "running" and old["host"] == socket.gethostname() and pid_alive(old["pid"]) and old["pid"] != os.getpid():
                    raise RuntimeError(f"run {run_id} is being trained by process {old['pid']}")
                sets = ", ".join(f"{k} = ?" for k in values)
                c.execute(
                    f"UPDATE runs SET {sets}, status = 'running', attempts = attempts + 1, error = NULL, "
                    "epochs_done = ? WHERE run_id = ?",
                    (*values.values(), resume_epochs, run_id),
                )
                c.execute("DELETE FROM epochs WHERE run_id = ? AND epoch > ?", (run_id, resume_epochs))
        return self.get(run_id)

    def record_epoch(self, run_id: str, epoch: int, *, train_loss: float, train_acc: float, val_loss: float,
                     val_acc: float, lr: float, seconds: float, train_seconds: float) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO epochs (run_id, epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds, "
                "train_seconds) VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds, train_seconds),
            )
            c.execute("UPDATE runs SET epochs_done = MAX(epochs_done, ?), updated_at = ? WHERE run_id = ?",
                      (epoch, time.time(), run_id))

    def finish(self, run_id: str, *, best_epoch: int, val_loss: float, val_acc: float, test_acc: float,
               test_auc: float, final: dict, wall_time_s: float) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status = 'finished', best_epoch = ?, val_loss = ?, val_acc = ?, test_acc = ?, "
                "test_auc = ?, final = ?, wall_time_s = ?, finished_at = ?, updated_at = ?, pid = NULL WHERE run_id = ?",
                (best_epoch, val_loss, val_acc, test_acc, test_auc, json.dumps(final, sort_keys=True), wall_time_s, now,
                 now, run_id),
            )

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """'failed' or 'interrupted' (the process is ending and says why)."""
        if status not in ("failed", "interrupted"):
            raise ValueError(f"mark() sets failed or interrupted, not {status!r}")
        with self.transaction() as c:
            c.execute("UPDATE runs SET status = ?, error = ?, updated_at = ?, pid = NULL WHERE run_id = ? "
                      "AND status = 'running'", (status, error, time.time(), run_id))

    def integrity(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]
