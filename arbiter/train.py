"""Full training runs, framework-neutral: configuration, batch orders, checkpoints, resume,
the run as an isolated task, and its ledger row.

Each framework trains with its own machinery in `impls/<pkg>/training.py` (Keras
`model.fit` with callbacks, a plain PyTorch loop, a jitted optax step); this module only
says WHAT to train and keeps the books.

Defaults (`TrainConfig`), and why
---------------------------------
The Gabor-CNN paper states Adam and ReduceLROnPlateau on the validation loss, nothing
more; where it is silent we take what its users got without asking:

* learning rate 1e-3: Adam's default in Keras, PyTorch and optax alike, and MedMNIST v2's
  benchmark setting;
* batch size 128: MedMNIST v2's benchmark setting (its ResNet baselines, the numbers the
  paper compares itself with);
* 50 epochs: the paper does not give its count; MedMNIST v2 trains 100. Half of that
  leaves the plateau schedule (patience 10) room for up to four reductions while a run
  on CPU stays affordable (20-110 s per epoch
  on 2 shared cores, benchmarks/train_epoch.py). The test metrics come from the best
  epoch by validation loss, so epochs past the minimum cost time, not accuracy;
* patience 10, cooldown 0, factor 0.1, min_delta 1e-4: these live in the knobs
  (`plateau_*`, `arbiter.knobs.Knobs`), not here, because the frameworks disagree on
  what they mean; the values are the Keras callback's and the PyTorch scheduler's own
  defaults, what a user who did not set them trained with (the reproduction report
  notes that the paper does not state them).
* No early stopping (the paper does not mention it) and min_lr 0 (all three defaults).

Batch order
-----------
Knob `shuffle='shared'`: every framework visits the training set in the same order, one
numpy permutation per epoch (`batch_order`), so a gap between frameworks cannot be
data-order noise. `shuffle='framework'`: each framework's own shuffler (tf.data shuffle,
torch RandomSampler, jax.random.permutation) seeded per epoch by `epoch_seed`. Both are
functions of (seed, epoch) alone, so a run resumed at epoch e sees exactly the batches
an uninterrupted run saw.

Train only the head
-------------------
`freeze_all_but_head`: only `head.*` is trained; every other tensor keeps its initial or
transferred value (`--init-weights`), and BatchNorm runs in inference mode (running
statistics used, not updated) in all three frameworks, which is what Keras does with a
layer set to trainable=False.

Checkpoints and resume
----------------------
`<runs>/checkpoints/<run_id>/` holds `config.json`, `best/` (the framework's best-by-
validation checkpoint), `epochs/<NNNN>/` (the last complete epoch: weights, optimizer
and scheduler state in the framework's own format, plus `state.json` with the epoch,
the history and a snapshot of `best/`), and after the run `weights.npz` (the chosen
checkpoint in canonical layout) and `predictions.npz`. An epoch directory is written
under a temporary name and renamed into place (atomic), so the newest one is always
complete; a killed run resumes from it and, with the determinism switches on, ends with
the metrics an uninterrupted run ends with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from arbiter import metrics as metrics_mod
from arbiter.data import Dataset
from arbiter.frameworks import FRAMEWORKS
from arbiter.knobs import NATIVE_PRESET, PRESETS, Knobs
from arbiter.ledger import Ledger
from arbiter.spec import ModelSpec

DEFAULT_EPOCHS = 50
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
DEFAULT_EVAL_BATCH_SIZE = 500

STATE_FILE = "state.json"
EPOCHS_DIR = "epochs"
BEST_DIR = "best"
_SEED_SALT = 0x7A11  # keeps batch orders independent of the weight-init stream of the same seed


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's result. Its hash is the run's ledger key."""

    framework: str
    seed: int
    knobs: Knobs
    dataset: str  # Dataset.name
    dataset_md5: str
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LR
    freeze_all_but_head: bool = False
    init_weights_md5: str | None = None  # canonical weights transferred in before training
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    device: str = "cpu"
    spec: ModelSpec = field(default_factory=ModelSpec)

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("epochs and batch size must be positive integers, the learning rate positive")

    def settings(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["knobs"] = self.knobs.to_dict()
        d["spec"] = self.spec.to_dict()
        return d

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_settings(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["knobs"] = Knobs.from_dict(d["knobs"])
        d["spec"] = ModelSpec.from_dict(d["spec"])
        return cls(**d)


# --------------------------------------------------------------------------------------
# Batch orders
# --------------------------------------------------------------------------------------


def batch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shared permutation of the training set for `epoch` (0-based)."""
    return np.random.default_rng([_SEED_SALT, seed, epoch]).permutation(n)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed for a framework's own shuffler and augmentation RNG in `epoch`."""
    return int(np.random.SeedSequence([_SEED_SALT, seed, epoch]).generate_state(1)[0] >> 1)


def epoch_plan(config: TrainConfig, epoch: int, n: int) -> tuple[np.ndarray | None, int]:
    """(order, seed) for the training pipeline in `epoch`: the shared permutation or None
    (the framework shuffles), and the seed of the framework's shuffler/augmentation."""
    order = batch_order(config.seed, epoch, n) if config.knobs.shuffle == "shared" else None
    return order, epoch_seed(config.seed, epoch)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


# --------------------------------------------------------------------------------------
# Progress: the rich bar and the ledger's epoch rows, fed by every framework's fit
# --------------------------------------------------------------------------------------


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # in effect during this epoch
    seconds: float
    train_seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Progress:
    """What a framework's `fit` reports to: a rich progress bar per epoch (loss, accuracy,
    learning rate) unless quiet, and one ledger row per finished epoch."""

    def __init__(self, total_epochs: int, ledger: Ledger | None = None, run_id: str | None = None,
                 quiet: bool = False, label: str = ""):
        self.total_epochs, self.ledger, self.run_id, self.quiet, self.label = total_epochs, ledger, run_id, quiet, label
        self._bar = None
        self._task = None

    def epoch_begin(self, epoch: int, steps: int, lr: float) -> None:
        """epoch: 0-based."""
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self._bar = Bar(
            TextColumn(f"{self.label}{epoch + 1}/{self.total_epochs}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, info=f"lr {lr:.2e}")
        self._lr = lr

    def batch_end(self, step: int, loss: float, acc: float) -> None:
        """step: 0-based within the epoch; loss and acc: running means over the epoch."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step + 1, info=f"loss {loss:.4f} acc {acc:.4f} | lr {self._lr:.1e}")

    def epoch_end(self, record: EpochRecord) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task,
                info=f"loss {record.train_loss:.4f} acc {record.train_acc:.4f} | val {record.val_loss:.4f} "
                f"{record.val_acc:.4f} | lr {record.lr:.1e}",
            )
            self._bar.stop()
            self._bar = None
        if self.ledger is not None:
            r = record.to_dict()
            r.pop("epoch")
            self.ledger.record_epoch(self.run_id, record.epoch, **r)


# --------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------


def run_dir_for(runs_root: str | Path, run_id: str) -> Path:
    return Path(runs_root) / "checkpoints" / run_id


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_epoch(run_dir: Path, epoch: int, state: dict, write: Callable[[Path], None]) -> Path:
    """Commit the checkpoint of the completed `epoch` (1-based): `write(folder)` puts the
    framework's files in a temporary folder, which gets `state.json` and a copy of
    `best/`, and is renamed into place; older epoch folders are then removed."""
    root = run_dir / EPOCHS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{epoch:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if (run_dir / BEST_DIR).exists():
        shutil.copytree(run_dir / BEST_DIR, tmp / BEST_DIR)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump({**state, "epoch": epoch}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"{epoch:04d}"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_epoch(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, state) of the newest complete epoch checkpoint, or None. Restores
    `best/` from that checkpoint's snapshot: a best checkpoint written after it (by an
    epoch the kill cut short) is discarded with the epoch."""
    root = run_dir / EPOCHS_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / STATE_FILE).is_file())
    if not done:
        return None
    folder = done[-1]
    state = json.loads((folder / STATE_FILE).read_text())
    shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
    if (folder / BEST_DIR).exists():
        shutil.copytree(folder / BEST_DIR, run_dir / BEST_DIR)
    return folder, state


def best_dir(run_dir: Path) -> Path:
    return run_dir / BEST_DIR


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then swap it in for `target`."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def new_history_state(config: TrainConfig) -> dict:
    """The framework-neutral part of an epoch checkpoint's state.json."""
    return {"history": [], "best_epoch": 0, "best_val_loss": float("inf"), "framework": {}}


def is_better(val_loss: float, best: float) -> bool:
    """The best-checkpoint rule (Keras ModelCheckpoint, mode 'min'): strictly lower."""
    return val_loss < best


# --------------------------------------------------------------------------------------
# One run, in this process
# --------------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: the run stops and is marked 'interrupted'."""


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def training_module(framework: str):
    """impls/<pkg>/training.py of a framework (imports the framework)."""
    return importlib.import_module(f"{FRAMEWORKS[framework][0]}.training")


def code_version() -> str:
    """`git describe` of the checkout, else the installed package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "arbiter " + version("arbiter")
    except Exception:  # noqa: BLE001 - not installed: say so instead of failing the run
        return "unknown"


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RunResult:
    run_id: str
    status: str  # 'finished', 'skipped' (already finished)
    row: Any = None


def execute(config: TrainConfig, data: Dataset, ledger: Ledger, runs_root: str | Path, *, quiet: bool = False,
            init_weights: str | Path | None = None) -> RunResult:
    """Train one run in this process, resuming from its last epoch checkpoint if any, and
    record it in the ledger. A finished run is not trained again."""
    run_id = config.run_id
    row = ledger.get(run_id)
    if row is not None and row.status == "finished":
        return RunResult(run_id, "skipped", row)
    if data.md5 != config.dataset_md5:
        raise ValueError(f"dataset md5 {data.md5} is not the configuration's {config.dataset_md5}")
    run_dir = run_dir_for(runs_root, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.settings(), indent=2, sort_keys=True))

    from arbiter.frameworks import load_adapter

    training = training_module(config.framework)
    adapter = load_adapter(config.framework, config.device)
    determinism = training.set_determinism(config.seed)  # after the adapter's own settings, which it may tighten
    env = adapter.environment()
    determinism = {"switches": determinism, "adapter": env.get("determinism", "")}
    resumed = latest_epoch(run_dir)
    history = resumed[1]["history"] if resumed else []
    ledger.start(run_id, framework=config.framework, seed=config.seed, settings=config.settings(), dataset=data.name,
                 dataset_md5=data.md5 or "", synthetic=data.synthetic, versions=env.get("versions", {}),
                 determinism=determinism, device=str(env.get("device", config.device)), code_version=code_version(),
                 run_dir=str(run_dir), resume_epochs=len(history))
    for rec in history:  # epoch rows of a resumed run come from its checkpoint, the source of truth
        r = dict(rec)
        ledger.record_epoch(run_id, r.pop("epoch"), **r)
    progress = Progress(config.epochs, ledger, run_id, quiet, label=f"{config.framework} s{config.seed} ")
    try:
        with _interruptible():
            model = adapter.build(config.spec, config.knobs, config.seed)
            if init_weights is not None:
                from arbiter.weights import load_weights

                weights, _ = load_weights(init_weights)
                adapter.import_weights(model, weights)
            history = training.fit(adapter, model, data, config, run_dir, progress)
            t0 = time.perf_counter()
            final = final_metrics(training, adapter, model, data, config, run_dir, history)
            eval_seconds = time.perf_counter() - t0
    except Interrupted as err:
        ledger.mark(run_id, "interrupted", f"signal {err}")
        raise
    except KeyboardInterrupt:
        ledger.mark(run_id, "interrupted", "KeyboardInterrupt")
        raise
    except BaseException as err:
        ledger.mark(run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    wall = float(sum(r["seconds"] for r in history) + eval_seconds)
    best = final["best_epoch"]
    best_val_loss = next(r["val_loss"] for r in history if r["epoch"] == best)  # under knob `loss`, as trained
    ledger.finish(run_id, best_epoch=best, val_loss=best_val_loss, val_acc=final["val"]["acc"],
                  test_acc=final["test"]["acc"], test_auc=final["test"]["auc"], final=final, wall_time_s=wall)
    return RunResult(run_id, "finished", ledger.get(run_id))


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a bare name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def final_metrics(training, adapter, model, data: Dataset, config: TrainConfig, run_dir: Path, history: list[dict]) -> dict:
    """MedMNIST metrics of the checkpoint chosen by validation loss (the model `fit`
    returned holds it), on val and test; saves its canonical weights and predictions."""
    from arbiter.weights import save_weights

    out: dict[str, Any] = {}
    arrays = {}
    for split in ("val", "test"):
        probs = np.asarray(training.evaluate(adapter, model, data, split, config), np.float64)
        labels = data.labels[split]
        m = metrics_mod.evaluate(labels, probs, data.num_classes)
        m["loss"] = cross_entropy(labels, probs)
        out[split] = m
        arrays[f"{split}_probs"] = probs.astype(np.float32)
        arrays[f"{split}_labels"] = labels
    _atomic_npz(run_dir / "predictions.npz", arrays)
    save_weights(run_dir / "weights.npz", adapter.export_weights(model), config.spec)
    best = min(history, key=lambda r: (r["val_loss"], r["epoch"])) if history else {"epoch": 0}
    out["best_epoch"] = int(best["epoch"])
    out["epochs"] = len(history)
    out["dataset_synthetic"] = bool(data.synthetic)
    return out


# --------------------------------------------------------------------------------------
# Runs as independent tasks (subprocesses), for compare and ablate
# --------------------------------------------------------------------------------------


def knobs_to_args(framework: str, knobs: Knobs) -> list[str]:
    """`--preset P --set fw.k=v ...` reproducing `knobs` from the framework's native
    preset: the command a user would type."""
    base = PRESETS[NATIVE_PRESET[framework]]
    args = ["--preset", NATIVE_PRESET[framework]]
    for name in base.differences(knobs):
        value = getattr(knobs, name)
        text = ",".join(repr(float(v)) for v in value) if isinstance(value, tuple) else str(value)
        args += ["--set", f"{framework}.{name}={text}"]
    return args


def train_argv(config: TrainConfig, data_args: Sequence[str], db: str | Path, *, quiet: bool = True,
               init_weights: str | Path | None = None) -> list[str]:
    """The `python -m arbiter train ...` command line of a configuration."""
    argv = [sys.executable, "-m", "arbiter", "train", "--framework", config.framework, "--seed", str(config.seed),
            *knobs_to_args(config.framework, config.knobs), "--epochs", str(config.epochs), "--batch-size",
            str(config.batch_size), "--lr", repr(config.learning_rate), "--eval-batch-size", str(config.eval_batch_size),
            "--device", config.device, "--db", str(db), *data_args]
    if config.freeze_all_but_head:
        argv.append("--freeze-all-but-head")
    if init_weights is not None:
        argv += ["--init-weights", str(init_weights)]
    if quiet:
        argv.append("--quiet")
    return argv


def launch(argv: list[str], log: Path | None = None, env: dict | None = None) -> int:
    """Run one training task as its own process; its output goes to `log` if given."""
    root = Path(__file__).resolve().parent.parent
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), environ.get("PYTHONPATH", "")) if p)
    if log is None:
        return subprocess.run(argv, env=environ).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.run(argv, env=environ, stdout=f, stderr=subprocess.STDOUT).returncode


def sweep(configs: list[TrainConfig], data_args: Sequence[str], db: str | Path, *, quiet: bool = True,
          log_dir: Path | None = None, on_event: Callable[[str, TrainConfig, int | None], None] | None = None) -> dict[str, str]:
    """Run every configuration not yet finished in the ledger, one process each, in
    order; return {run_id: status}. A failed run does not stop the sweep."""
    result = {}
    for config in configs:
        with Ledger(db) as ledger:
            row = ledger.get(config.run_id)
        if row is not None and row.status == "finished":
            result[config.run_id] = "skipped"
            if on_event:
                on_event("skipped", config, None)
            continue
        if on_event:
            on_event("start", config, None)
        log = log_dir / f"{config.run_id}.log" if log_dir else None
        rc = launch(train_argv(config, data_args, db, quiet=quiet), log)
        with Ledger(db) as ledger:
            row = ledger.get(config.run_id)
        result[config.run_id] = row.status if row else "failed"
        if on_event:
            on_event("done", config, rc)
        if rc in (130, -signal.SIGINT, -signal.SIGTERM):
            raise KeyboardInterrupt
    return result
