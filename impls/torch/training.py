"""Full training in PyTorch, the way its users write it: a plain loop over a DataLoader,
`torch.optim.Adam` (the adapter's, which honours the epsilon knobs) and
`torch.optim.lr_scheduler.ReduceLROnPlateau` stepped once per epoch on the validation
loss; checkpoints are `torch.save` files of the state_dicts.

The harness's side (what to train, batch orders, checkpoint folders, the ledger) is
`arbiter.train`; this module only runs the epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from arbiter.data import Dataset
from arbiter.train import (
    EpochRecord,
    Progress,
    TrainConfig,
    best_dir,
    epoch_plan,
    is_better,
    latest_epoch,
    new_history_state,
    replace_dir,
    save_epoch,
    steps_per_epoch,
)
from impls.base import Model

from . import pipeline
from .adapter import cross_entropy, make_plateau_scheduler

CHECKPOINT = "checkpoint.pt"
BEST = "model.pt"


def set_determinism(seed: int) -> dict:
    """The switches that make a CPU run repeat bit for bit; returned for the ledger."""
    torch.manual_seed(seed)
    # warn_only as the adapter sets it: on CPU every op used here is deterministic; on a
    # GPU an op without a deterministic kernel warns instead of ending a long run
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # One intra-op thread: with two OpenMP threads on a loaded machine, a resumed run
    # differed from the uninterrupted one by 3e-5 in validation loss (twice in six runs of
    # tests/test_training.py); with one, CPU runs repeat bit for bit, and on these 2-core
    # machines one thread was also faster under load (0.45 s vs 2.5 s a step).
    torch.set_num_threads(1)
    return {
        "torch.manual_seed": seed,
        "torch.use_deterministic_algorithms": "True (warn_only)",
        "cudnn.benchmark": False,
        "DataLoader": "num_workers=0; RandomSampler and flips on explicitly seeded torch.Generators",
        "threads": torch.get_num_threads(),
    }


def freeze_all_but_head(net: torch.nn.Module) -> None:
    """Only `head.*` keeps requires_grad; the rest stays at its initial/transferred values
    (the optimiser skips parameters without a gradient)."""
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("head."))


def _set_mode(net: torch.nn.Module, config: TrainConfig) -> None:
    # frozen layers run in inference mode (running statistics, no update), as a Keras
    # layer with trainable=False does; the head has no train-mode behaviour of its own
    net.train(not config.freeze_all_but_head)


def _batches(adapter, loader):
    for x, y in loader:
        yield adapter._input(x), adapter._labels(y), len(y)


def validate(adapter, model: Model, data: Dataset, config: TrainConfig) -> tuple[float, float]:
    """(mean loss under knob `loss`, accuracy) on the validation split, eval mode."""
    net = model.net
    net.eval()
    loader = pipeline.make_loader(data, "val", config.knobs, False, config.seed, config.eval_batch_size)
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y, b in _batches(adapter, loader):
            logits = net(x)
            total += float(cross_entropy(logits, y, config.knobs.loss)) * b
            correct += int((logits.argmax(dim=1) == y).sum())
            n += b
    return total / n, correct / n


def evaluate(adapter, model: Model, data: Dataset, split: str, config: TrainConfig) -> np.ndarray:
    """Softmax probabilities (N, classes) on `split`, in the npz order, eval mode."""
    net = model.net
    net.eval()
    loader = pipeline.make_loader(data, split, config.knobs, False, config.seed, config.eval_batch_size)
    out = []
    with torch.no_grad():
        for x, _, _ in _batches(adapter, loader):
            out.append(torch.softmax(net(x), dim=1).cpu().numpy())
    return np.concatenate(out)


def fit(adapter, model: Model, data: Dataset, config: TrainConfig, run_dir: Path, progress: Progress) -> list[dict]:
    """Train for config.epochs (resuming from the last epoch checkpoint in run_dir), leave
    the best-by-validation-loss weights in `model`, return the per-epoch history."""
    net, knobs = model.net, config.knobs
    if config.freeze_all_but_head:
        freeze_all_but_head(net)
    optimizer = adapter.make_optimizer(model, config.learning_rate)
    scheduler = make_plateau_scheduler(optimizer, knobs)
    state = new_history_state(config)
    start = 0
    resumed = latest_epoch(run_dir)
    if resumed is not None:
        folder, state = resumed
        ckpt = torch.load(folder / CHECKPOINT, weights_only=False)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start = state["epoch"]

    n = len(data.labels["train"])
    steps = steps_per_epoch(n, config.batch_size)
    for epoch in range(start, config.epochs):
        order, seed = epoch_plan(config, epoch, n)
        loader = pipeline.make_loader(data, "train", knobs, True, seed, config.batch_size, order=order)
        lr = float(optimizer.param_groups[0]["lr"])
        progress.epoch_begin(epoch, steps, lr)
        t0 = time.perf_counter()
        _set_mode(net, config)
        total, correct, seen = 0.0, 0, 0
        for step, (x, y, b) in enumerate(_batches(adapter, loader)):
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = cross_entropy(logits, y, knobs.loss)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * b
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += b
            progress.batch_end(step, total / seen, correct / seen)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = validate(adapter, model, data, config)
        scheduler.step(val_loss)
        record = EpochRecord(epoch + 1, total / seen, correct / seen, val_loss, val_acc, lr,
                             time.perf_counter() - t0, train_seconds)
        state["history"].append(record.to_dict())
        if is_better(val_loss, state["best_val_loss"]):
            state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
            replace_dir(best_dir(run_dir), lambda d: torch.save(net.state_dict(), d / BEST))

        def write(folder: Path) -> None:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, folder / CHECKPOINT)

        save_epoch(run_dir, epoch + 1, state, write)
        progress.epoch_end(record)

    net.load_state_dict(torch.load(best_dir(run_dir) / BEST, weights_only=True))
    net.eval()
    return state["history"]
