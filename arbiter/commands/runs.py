"""`python -m arbiter runs`: the run ledger as a table (or JSON)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from arbiter.ledger import DEFAULT_DB

NAME = "runs"
HELP = "list the training runs recorded in the ledger"
DESCRIPTION = """\
List every training run in the ledger (--db, default runs/arbiter.db): its id (a hash of the
full configuration), framework, seed, status (running, finished, failed, interrupted; a
'running' run whose process is gone shows as 'stale'), epochs done, test accuracy and AUC
of the checkpoint chosen by validation loss, and wall time. --json prints every column,
per-epoch metrics included with --epochs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"run ledger (default {DEFAULT_DB})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--status", choices=("running", "finished", "failed", "interrupted"), help="only runs with this status")
    parser.add_argument("--framework", help="only runs of this framework")
    parser.add_argument("--epochs", action="store_true", help="with --json: include per-epoch metrics")


def knobs_label(framework: str, settings: dict) -> str:
    """'native', another preset's name, or native plus the knobs that differ from it."""
    from arbiter.knobs import NATIVE_PRESET, PRESETS, Knobs, KnobError, show_value

    try:
        knobs = Knobs.from_dict(settings)
    except (KnobError, TypeError):
        return "?"
    native = PRESETS.get(NATIVE_PRESET.get(framework, ""))
    if native == knobs:
        return "native"
    named = [name for name, preset in PRESETS.items() if preset == knobs]
    if named:
        return named[0]
    diff = native.differences(knobs) if native is not None else []
    return "native + " + ", ".join(f"{k}={show_value(getattr(knobs, k))}" for k in diff)


def run(args: argparse.Namespace) -> int:
    from arbiter.cli import UsageError
    from arbiter.ledger import Ledger

    if not Path(args.db).is_file():
        raise UsageError(f"no ledger at {args.db}; train something first (python -m arbiter train ...)")
    with Ledger(args.db) as ledger:
        rows = [r for r in ledger.runs(status=args.status) if args.framework in (None, r.framework)]
        stale = {r.run_id for r in rows if ledger.stale(r)}
        epochs = {r.run_id: ledger.epochs(r.run_id) for r in rows} if args.epochs else {}
    if args.json:
        out = []
        for r in rows:
            d = r.to_dict()
            d["stale"] = r.run_id in stale
            if args.epochs:
                d["epoch_metrics"] = epochs[r.run_id]
            out.append(d)
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"arbiter runs ({args.db})")
    for col in ("run", "framework", "seed", "knobs", "data", "status", "epochs", "best", "test acc", "test auc", "time", "started"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = "stale" if r.run_id in stale else r.status
        tags = [knobs_label(r.framework, r.settings.get("knobs", {}))]
        if r.settings.get("freeze_all_but_head"):
            tags.append("head-only")
        if r.settings.get("init_weights_md5"):
            tags.append("transferred")
        table.add_row(
            r.run_id,
            r.framework,
            str(r.seed),
            " ".join(tags),
            r.dataset + (" (SYNTHETIC)" if r.synthetic else ""),
            status,
            f"{r.epochs_done}/{r.settings.get('epochs', '?')}",
            "-" if r.best_epoch is None else str(r.best_epoch),
            "-" if r.test_acc is None else f"{r.test_acc:.4f}",
            "-" if r.test_auc is None else f"{r.test_auc:.4f}",
            "-" if r.wall_time_s is None else f"{r.wall_time_s:.0f} s",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at)),
        )
    Console(width=200).print(table)
    return 0
