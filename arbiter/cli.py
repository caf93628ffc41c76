"""`python -m arbiter COMMAND ...`: the command line.

Each command lives in its own module under `arbiter/commands/` and provides
`NAME`, `HELP`, `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`.
Errors the user can fix (bad arguments, bad data files, missing frameworks) are one line
on stderr and exit code 2; a run that completes exits 0 whatever its verdict.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# TensorFlow and XLA are chatty on import; quiet them here, in the CLI, not in library code.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")

COMMANDS = (
    "arbiter.commands.info",
    "arbiter.commands.knobs",
    "arbiter.commands.data",
    "arbiter.commands.triangulate",
    "arbiter.commands.selftest",
    "arbiter.commands.train",
    "arbiter.commands.compare",
    "arbiter.commands.ablate",
    "arbiter.commands.runs",
)

EXIT_USAGE = 2


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arbiter",
        description="Settle cross-framework reproduction disputes: one hybrid Gabor-CNN implemented in "
        "TensorFlow/Keras, PyTorch and JAX/Flax, compared stage by stage on identical inputs and weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from arbiter.data import DataError
    from arbiter.knobs import KnobError, KnobNotSupported
    from impls.base import DeviceUnavailable, FrameworkUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["triangulate"] and "--train" in argv:
        # the spelling of the training comparison: `triangulate --train` is `compare`
        argv = ["compare"] + [a for a in argv[1:] if a != "--train"]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UsageError, KnobError, KnobNotSupported, DataError, FrameworkUnavailable, DeviceUnavailable) as err:
        print(f"arbiter {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"arbiter {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
