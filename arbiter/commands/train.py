"""`python -m arbiter train`: one full training run of one framework, recorded in the ledger."""

from __future__ import annotations

import argparse
from pathlib import Path

from arbiter.cli import UsageError
from arbiter.data import add_data_arguments, dataset_from_args
from arbiter.frameworks import FRAMEWORK_KEYS
from arbiter.knobs import NATIVE_PRESET, PRESETS, Knobs, parse_override
from arbiter.ledger import DEFAULT_DB

NAME = "train"
HELP = "train one framework for one seed (resumes an interrupted run, skips a finished one)"
DESCRIPTION = """\
Train the Gabor-CNN in one framework with that framework's own machinery (Keras model.fit
with its callbacks, a plain PyTorch loop, a jitted optax step), Adam and ReduceLROnPlateau
on the validation loss, then score the checkpoint chosen by validation loss on the test
split the MedMNIST way (ACC, AUC).

The run is recorded in the ledger (--db) under a hash of its full configuration. Running
the same command again skips it when it finished and resumes it from its last per-epoch
checkpoint when it was interrupted, with the same final metrics as an uninterrupted run.

Defaults (see arbiter/train.py for why): 50 epochs, batch size 128, learning rate 1e-3,
plateau patience 10 and cooldown 0 (knobs plateau_*).

examples:
  python -m arbiter train --framework torch --seed 0 --dataset synthetic
  python -m arbiter train --framework tf --preset aligned --set tf.bn_momentum=0.9 --seed 1
  python -m arbiter train --framework flax --seed 0 --init-weights runs/checkpoints/<id>/weights.npz --freeze-all-but-head"""


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="native", choices=("native", *PRESETS),
                        help="knob preset: 'native' gives each framework its own (default), or one preset for all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FRAMEWORK.KNOB=VALUE",
                        help="override one knob of one framework (repeatable); `python -m arbiter knobs` lists them")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    from arbiter.train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_EVAL_BATCH_SIZE, DEFAULT_LR

    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"initial learning rate (default {DEFAULT_LR:g})")
    parser.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu", help="device (default cpu)")
    parser.add_argument("--freeze-all-but-head", action="store_true",
                        help="train only the classifier (head.*): everything else stays at its initial or transferred "
                        "weights, BatchNorm in inference mode (the reproduction advice's diagnostic)")
    parser.add_argument("--init-weights", type=Path, default=None, metavar="NPZ",
                        help="canonical weights to transfer in before training (e.g. another run's weights.npz)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"run ledger (default {DEFAULT_DB}); checkpoints go "
                        "beside it in checkpoints/")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", required=True, choices=FRAMEWORK_KEYS)
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and augmentation")
    add_preset_arguments(parser)
    add_schedule_arguments(parser)
    add_data_arguments(parser)


def knobs_for(framework: str, preset_name: str, overrides: list[str], strict: bool = False) -> Knobs:
    """The framework's knobs: its preset, then the --set overrides that name it (with
    strict, an override naming another framework is an error)."""
    knobs = PRESETS[NATIVE_PRESET[framework] if preset_name == "native" else preset_name]
    for text in overrides:
        fw, name, value = parse_override(text, FRAMEWORK_KEYS)
        if fw == framework:
            knobs = knobs.replace(**{name: value})
        elif strict:
            raise UsageError(f"--set {text} names {fw}, but this run trains {framework}")
    return knobs


def data_args(args: argparse.Namespace) -> list[str]:
    """The data options of `args`, for a child `train` process."""
    out = ["--dataset", str(args.dataset), "--size", str(args.size)]
    if args.data_root is not None:
        out += ["--data-root", str(Path(args.data_root).resolve())]
    if args.no_download:
        out.append("--no-download")
    return out


def config_from_args(args: argparse.Namespace, framework: str, seed: int, knobs: Knobs, data):
    from arbiter.train import TrainConfig, file_md5

    init_md5 = None
    if args.init_weights is not None:
        if not Path(args.init_weights).is_file():
            raise UsageError(f"--init-weights {args.init_weights} does not exist")
        init_md5 = file_md5(args.init_weights)
    try:
        return TrainConfig(framework=framework, seed=seed, knobs=knobs, dataset=data.name, dataset_md5=data.md5 or "",
                           epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                           freeze_all_but_head=args.freeze_all_but_head, init_weights_md5=init_md5,
                           eval_batch_size=args.eval_batch_size, device=args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from arbiter.ledger import Ledger
    from arbiter.train import Interrupted, execute

    knobs = knobs_for(args.framework, args.preset, args.overrides, strict=True)
    data = dataset_from_args(args)
    config = config_from_args(args, args.framework, args.seed, knobs, data)
    with Ledger(args.db) as ledger:
        try:
            result = execute(config, data, ledger, Path(args.db).parent, quiet=args.quiet, init_weights=args.init_weights)
        except Interrupted as err:
            print(f"arbiter train: run {config.run_id} interrupted ({err}); run the same command again to resume")
            return 130
        row = result.row
    if result.status == "skipped":
        print(f"run {config.run_id} already finished: test acc {row.test_acc:.4f}, auc {row.test_auc:.4f} (skipped)")
        return 0
    synthetic = " [SYNTHETIC data]" if row.synthetic else ""
    print(f"run {config.run_id} {args.framework} seed {args.seed}: best epoch {row.best_epoch}, "
          f"test acc {row.test_acc:.4f}, auc {row.test_auc:.4f}, {row.wall_time_s:.1f} s{synthetic}")
    return 0
