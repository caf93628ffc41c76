"""Seconds per training epoch per framework, on the synthetic DermaMNIST stand-in (7007
training images, 1003 validation images) at the default batch size.

Each framework trains for a few epochs through the real `python -m arbiter train` (its own
process, the same code path as any run); the per-epoch times come from the run ledger.
The first epoch includes compilation (XLA for Keras and Flax) and warm-up and is reported
separately; the steady state is the median of the later epochs. `train` is the training
pass alone, `epoch` adds the validation pass. Runs go to a throw-away ledger.

    python benchmarks/train_epoch.py [--epochs 3] [--frameworks tf,torch,flax] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(framework: str, epochs: int, batch_size: int, db: Path, data_args: list[str]) -> dict:
    from arbiter.ledger import Ledger

    cmd = [sys.executable, "-m", "arbiter", "train", "--framework", framework, "--seed", "0", "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--db", str(db), "--quiet", *data_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    with Ledger(db) as ledger:
        row = next(r for r in ledger.runs() if r.framework == framework)
        rows = ledger.epochs(row.run_id)
    later = rows[1:] or rows
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "first_epoch_s": rows[0]["seconds"],
        "first_train_s": rows[0]["train_seconds"],
        "epoch_s": median([r["seconds"] for r in later]),
        "train_s": median([r["train_seconds"] for r in later]),
        "process_wall_s": wall,
        "epochs": len(rows),
        "test_acc": row.test_acc,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", default="tf,torch,flax")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: arbiter.train's default batch size")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from arbiter.train import DEFAULT_BATCH_SIZE

    batch = args.batch_size or DEFAULT_BATCH_SIZE
    data_args = ["--dataset", "synthetic"] + (["--data-root", args.data_root] if args.data_root else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fw in args.frameworks.split(","):
            results[fw] = measure(fw, args.epochs, batch, Path(tmp) / "bench.db", data_args)
            print(fw, json.dumps(results[fw]), flush=True)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    meta = {"batch_size": batch, "epochs": args.epochs, "cpus": os.cpu_count(), "load_avg": load,
            "machine": platform.machine(), "python": platform.python_version()}
    print(f"\nseconds per epoch, synthetic stand-in (7007 train / 1003 val), batch {batch}, {os.cpu_count()} CPUs, "
          f"load average {load}")
    print("| framework | steady epoch (train + val) | steady train pass | first epoch (with compile) |")
    print("|---|---|---|---|")
    for fw, r in results.items():
        if "error" in r:
            print(f"| {fw} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} | | |")
        else:
            print(f"| {fw} | {r['epoch_s']:.1f} s | {r['train_s']:.1f} s | {r['first_epoch_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
