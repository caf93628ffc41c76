"""The run ledger: transactions, resume bookkeeping, no half-written rows after a real
kill, no duplicates after a repeated sweep, and reports read back from it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from arbiter import train
from arbiter.knobs import PRESETS
from arbiter.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent


def _start(ledger: Ledger, run_id: str, framework: str = "torch", seed: int = 0, resume_epochs: int = 0, synthetic=True):
    return ledger.start(run_id, framework=framework, seed=seed, settings={"epochs": 3, "knobs": {"shuffle": "shared"}},
                        dataset="synthetic-dermamnist", dataset_md5="abc", synthetic=synthetic, versions={"torch": "x"},
                        determinism={"switches": {"a": True}}, device="cpu", code_version="test", run_dir="/tmp/x",
                        resume_epochs=resume_epochs)


def _epoch(ledger: Ledger, run_id: str, epoch: int, val_loss: float = 1.0, val_acc: float = 0.5):
    ledger.record_epoch(run_id, epoch, train_loss=1.0 / epoch, train_acc=0.5, val_loss=val_loss, val_acc=val_acc, lr=1e-3,
                        seconds=1.0, train_seconds=0.8)


def _finish(ledger: Ledger, run_id: str, acc: float, confusion=None):
    final = {"test": {"acc": acc, "auc": 0.9, "confusion": confusion or np.eye(7, dtype=int).tolist(), "majority_rate": 0.669}}
    ledger.finish(run_id, best_epoch=2, val_loss=0.5, val_acc=acc, test_acc=acc, test_auc=0.9, final=final, wall_time_s=3.0)


def test_roundtrip_and_wal(tmp_path):
    with Ledger(tmp_path / "l.db") as ledger:
        assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = _start(ledger, "r1")
        assert (row.status, row.attempts, row.pid) == ("running", 1, os.getpid())
        for e in (1, 2, 3):
            _epoch(ledger, "r1", e)
        _finish(ledger, "r1", 0.75)
        row = ledger.get("r1")
        assert (row.status, row.test_acc, row.epochs_done, row.pid) == ("finished", 0.75, 3, None)
        assert row.settings["knobs"] == {"shuffle": "shared"} and row.determinism == {"switches": {"a": True}}
        assert [e["epoch"] for e in ledger.epochs("r1")] == [1, 2, 3]
        with pytest.raises(RuntimeError, match="already finished"):
            _start(ledger, "r1")


def test_a_finished_row_must_carry_its_metrics(tmp_path):
    """The CHECK constraint: no write can leave 'finished' without metrics, or metrics on
    an unfinished row."""
    with Ledger(tmp_path / "l.db") as ledger:
        _start(ledger, "r1")
        with pytest.raises(sqlite3.IntegrityError):
            ledger.conn.execute("UPDATE runs SET status = 'finished' WHERE run_id = 'r1'")
        with pytest.raises(sqlite3.IntegrityError):
            ledger.conn.execute("UPDATE runs SET test_acc = 0.5, test_auc = 0.5, final = '{}' WHERE run_id = 'r1'")
        assert ledger.get("r1").status == "running"


def test_resume_takes_over_a_dead_run_and_drops_epochs_past_its_checkpoint(tmp_path):
    with Ledger(tmp_path / "l.db") as ledger:
        _start(ledger, "r1")
        for e in (1, 2, 3):
            _epoch(ledger, "r1", e)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        ledger.conn.execute("UPDATE runs SET pid = ? WHERE run_id = 'r1'", (dead.pid,))  # as if that process was killed
        assert ledger.stale(ledger.get("r1"))
        row = _start(ledger, "r1", resume_epochs=2)  # the checkpoint only got to epoch 2
        assert (row.status, row.attempts, row.epochs_done) == ("running", 2, 2)
        assert [e["epoch"] for e in ledger.epochs("r1")] == [1, 2]


def test_a_killed_but_unreaped_process_counts_as_dead():
    from arbiter.ledger import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.time() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet waited for: a zombie
        assert time.time() < deadline
        time.sleep(0.01)
    try:
        assert not pid_alive(child.pid) and pid_alive(os.getpid())
    finally:
        child.wait()


def test_a_live_run_is_not_taken_over(tmp_path):
    with Ledger(tmp_path / "l.db") as ledger:
        _start(ledger, "r1")
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            ledger.conn.execute("UPDATE runs SET pid = ? WHERE run_id = 'r1'", (live.pid,))
            with pytest.raises(RuntimeError, match="being trained by process"):
                _start(ledger, "r1")
        finally:
            live.kill()
            live.wait()


def test_mark_interrupted_and_failed(tmp_path):
    with Ledger(tmp_path / "l.db") as ledger:
        _start(ledger, "r1")
        ledger.mark("r1", "interrupted", "signal SIGTERM")
        row = ledger.get("r1")
        assert (row.status, row.error, row.test_acc) == ("interrupted", "signal SIGTERM", None)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from arbiter.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    i = 0
    while True:
        rid = f"run{{i}}"
        ledger.start(rid, framework="torch", seed=i, settings={{"epochs": 3}}, dataset="d", dataset_md5="m",
                     synthetic=True, versions={{}}, determinism={{}}, device="cpu", code_version="t", run_dir="/x")
        for e in (1, 2, 3):
            ledger.record_epoch(rid, e, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, lr=1e-3,
                                seconds=0.1, train_seconds=0.1)
        ledger.finish(rid, best_epoch=3, val_loss=1.0, val_acc=0.5, test_acc=0.5, test_auc=0.5,
                      final={{"test": {{}}}}, wall_time_s=0.3)
        i += 1
        print(i, flush=True)
    """
)


def test_sigkill_mid_write_leaves_no_half_written_row(tmp_path):
    """Kill a real process that writes runs as fast as it can, at an arbitrary moment:
    every finished row is complete, every other row carries no metrics, and the file is
    intact."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    db = tmp_path / "l.db"
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True)
    for _ in range(30):  # let it get well into its loop
        proc.stdout.readline()
    time.sleep(0.0137)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Ledger(db) as ledger:
        assert ledger.integrity() == "ok"
        rows = ledger.runs()
        assert len(rows) >= 30
        for row in rows:
            epochs = ledger.epochs(row.run_id)
            if row.status == "finished":
                assert row.test_acc is not None and row.final is not None and len(epochs) == 3
            else:
                assert row.status == "running" and row.test_acc is None and ledger.stale(row)
        assert len({r.run_id for r in rows}) == len(rows)


def _config(seed: int, framework: str = "torch") -> train.TrainConfig:
    return train.TrainConfig(framework=framework, seed=seed, knobs=PRESETS["aligned"], dataset="synthetic-dermamnist",
                             dataset_md5="abc", epochs=2, batch_size=16)


def test_repeated_sweep_skips_finished_runs(tmp_path, monkeypatch):
    db = tmp_path / "l.db"
    configs = [_config(0), _config(1)]
    with Ledger(db) as ledger:
        for c in configs:
            _start(ledger, c.run_id)
            _finish(ledger, c.run_id, 0.7)
    launched = []
    monkeypatch.setattr(train, "launch", lambda argv, log=None, env=None: launched.append(argv) or 0)
    result = train.sweep(configs + configs, [], db)
    assert launched == [] and set(result.values()) == {"skipped"}
    with Ledger(db) as ledger:
        assert len(ledger.runs()) == 2


def test_comparison_report_reads_its_numbers_from_the_ledger(tmp_path):
    from arbiter.commands import compare

    db = tmp_path / "l.db"
    accs = {"tf": [0.770, 0.772, 0.768], "torch": [0.731, 0.735, 0.729], "flax": [0.733, 0.728, 0.732]}
    groups = {}
    with Ledger(db) as ledger:
        for fw, values in accs.items():
            groups[fw] = []
            for seed, acc in enumerate(values):
                c = _config(seed, fw)
                _start(ledger, c.run_id, framework=fw, seed=seed)
                for e in (1, 2):
                    _epoch(ledger, c.run_id, e, val_loss=1.0 / e, val_acc=acc - 0.01 * (2 - e))
                _finish(ledger, c.run_id, acc)
                groups[fw].append(c.run_id)
    result = compare.comparison(db, groups)
    out = tmp_path / "report"
    result = compare.write_comparison_report(result, out, "python -m arbiter compare ...", {"epochs": 2, "batch_size": 16,
                                             "learning_rate": 1e-3, "preset": "native"})
    assert (result["verdict"], result["outlier"]) == ("deviates", "tf")
    md = (out / "report.md").read_text()
    assert "SYNTHETIC" in md and "**tf is the outlier**" in md
    assert f"{100 * np.mean(accs['torch']):.2f}" in md  # the ledger's numbers, not recomputed ones
    saved = json.loads((out / "report.json").read_text())
    assert saved["summaries"]["tf"]["values"] == accs["tf"]
    for png in ("training_curves.png", "accuracy.png", "confusion.png"):
        assert (out / png).stat().st_size > 1000


def test_ablation_analysis_from_the_ledger(tmp_path):
    from arbiter.commands import ablate

    base, target = PRESETS["torch-native"], PRESETS["tf-native"]
    moved, variants = ablate.plan(base, target, ["stride2_padding", "bn_momentum"], cumulative=True)
    assert moved == ["stride2_padding", "bn_momentum"]
    assert set(variants) == {"baseline", "+stride2_padding", "+bn_momentum", "..stride2_padding", "..bn_momentum"}
    assert variants["..stride2_padding"] == variants["+stride2_padding"]  # trained once: same config, same run id
    acc = {"baseline": [0.73, 0.74], "+stride2_padding": [0.75, 0.76], "+bn_momentum": [0.73, 0.745],
           "..stride2_padding": [0.75, 0.76], "..bn_momentum": [0.76, 0.77], "reference": [0.77, 0.78]}
    db = tmp_path / "l.db"
    groups, reference = {}, []
    with Ledger(db) as ledger:
        for name, values in acc.items():
            for seed, a in enumerate(values):
                rid = f"{name}-{seed}"
                _start(ledger, rid, seed=seed)
                _finish(ledger, rid, a)
                (reference if name == "reference" else groups.setdefault(name, [])).append(rid)
    result = ablate.analyse(db, "torch", moved, groups, reference, base, target)
    assert result["gap_points"] == pytest.approx(4.0)
    rows = {r["knob"]: r for r in result["knobs"]}
    assert rows["stride2_padding"]["single"] == pytest.approx(2.0)
    assert rows["bn_momentum"]["cumulative"] == pytest.approx(3.0)
    assert result["closed_fraction"] == pytest.approx(0.75)
    out = tmp_path / "ablation"
    ablate.write_report(result, out, "python -m arbiter ablate ...", {"toward": "tf", "epochs": 2, "batch_size": 16,
                        "learning_rate": 1e-3, "seeds": [0, 1]})
    md = (out / "report.md").read_text()
    assert "SYNTHETIC" in md and "the gap is +4.00 points" in md and (out / "ablation.png").is_file()


def test_majority_knobs():
    from arbiter.commands import ablate

    frameworks = {"tf": PRESETS["tf-native"], "torch": PRESETS["torch-native"], "flax": PRESETS["flax-native"]}
    target, tied = ablate.majority_knobs(frameworks, PRESETS["torch-native"])
    assert target.stride2_padding == "tf_same"  # tf and flax
    assert target.bn_momentum == 0.99 and target.loss == "logits"  # tf+flax; torch+flax
    assert "kernel_init" in tied and target.kernel_init == "kaiming_uniform_a_sqrt5"  # three different values: kept
