"""`python -m arbiter triangulate`: stage-by-stage numerical triangulation."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from rich.console import Console

from arbiter import data as data_mod
from arbiter.compare import AGREE
from arbiter.session import PRESET_CHOICES, knobs_for, load_adapters, make_probe, parse_frameworks, reference_framework, spec_for
from arbiter.stages import STAGES
from arbiter.triangulate import Triangulator, summarize
from impls.base import DEVICES

NAME = "triangulate"
HELP = "run the three frameworks stage by stage on identical inputs and weights; name who deviates and why"
DESCRIPTION = """\
Run TensorFlow/Keras, PyTorch and JAX/Flax through 10 numerical stages on identical inputs
and identical (transferred) weights:

  preprocessing   each framework's own input pipeline on the same uint8 batch
  gabor-bank      the fixed Gabor kernels
  gabor-conv      the Gabor convolution output
  forward-eval    every named activation, eval mode
  forward-train   every named activation, train mode (batch statistics)
  loss            cross-entropy (plus a saturated-head probe where a probability clip engages)
  gradients       per parameter
  adam-step       one Adam step: parameters, BN statistics, Adam moments
  trajectory      K steps on a fixed batch sequence
  lr-schedule     each framework's own ReduceLROnPlateau on a scripted val-loss sequence

Each stage gets a verdict: agree, deviates (2 of 3 agree; the third is named), or
no-majority. A stage that does not agree is re-run with knobs moved one at a time toward
the majority's values until it agrees; the knobs that were needed explain the deviation.

Presets: native (each framework with its users' defaults: tf-native, torch-native,
flax-native), aligned (one shared setting: every stage must agree), or one named preset
for all. --set FRAMEWORK.KNOB=VALUE overrides one knob (see `python -m arbiter knobs`).

Exit status: 0 when the run completes, whatever the verdict (1 with --fail-on-deviation
if any stage does not agree); 2 for bad arguments or data."""


def add_arguments(parser):
    data_mod.add_data_arguments(parser)
    parser.add_argument("--preset", choices=PRESET_CHOICES, default="native", help="knob preset (default: native)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FW.KNOB=VALUE",
                        help="override one knob of one framework, e.g. torch.adam_epsilon=1e-7 (repeatable)")
    parser.add_argument("--frameworks", default="tf,torch,flax", help="comma-separated subset of tf,torch,flax (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the batch choice and the probe weights (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="trajectory length K (default 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for the step stages (default 1e-3)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device (default: accelerator if present)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/triangulate-<timestamp>)")
    parser.add_argument("--fail-on-deviation", action="store_true", help="exit 1 if any stage does not agree")
    parser.add_argument("--train", action="store_true",
                        help="instead of the numerical stages, train seeds x frameworks and compare test accuracy: "
                        "the same as `python -m arbiter compare` and takes its options (see `compare --help`)")


def build_report(args, data, triangulator, outcomes, missing, seconds) -> dict:
    frameworks = triangulator.frameworks
    envs = {fw: triangulator.adapters[fw].environment() for fw in frameworks}
    return {
        "command": "triangulate",
        "preset": args.preset,
        "overrides": args.overrides,
        "frameworks": list(frameworks),
        "missing_frameworks": missing,
        "reference": triangulator.reference,
        "dataset": {"name": data.name, "display_name": data.display_name, "synthetic": data.synthetic, "md5": data.md5, "path": str(data.path)},
        "synthetic": data.synthetic,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "trajectory_steps": args.steps,
        "learning_rate": args.lr,
        "settings": {fw: triangulator.knobs[fw].to_dict() for fw in frameworks},
        "versions": {fw: envs[fw].get("versions", {}) for fw in frameworks},
        "device": {fw: envs[fw].get("device") for fw in frameworks},
        "environment": envs,
        "process": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "stages": [o.to_dict(frameworks) for o in outcomes],
        "findings": summarize(outcomes),
        "not_testable": outcomes[0].not_testable if outcomes else [],
        "seconds": round(seconds, 2),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }


def select_stages(text: str | None):
    if not text:
        return STAGES
    wanted = [s.strip() for s in text.split(",")]
    names = {s.name for s in STAGES}
    bad = [w for w in wanted if w not in names]
    if bad:
        from arbiter.cli import UsageError

        raise UsageError(f"unknown stage {bad[0]!r}; stages: {', '.join(s.name for s in STAGES)}")
    return tuple(s for s in STAGES if s.name in wanted)


def run(args) -> int:
    from arbiter.cli import UsageError
    from arbiter.report import print_table, write_report

    t0 = time.perf_counter()
    console = Console(stderr=True)
    frameworks = parse_frameworks(args.frameworks)
    knobs = knobs_for(frameworks, args.preset, args.overrides)
    stages = select_stages(args.stages)
    for name, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    data = data_mod.dataset_from_args(args)
    t_data = time.perf_counter()
    adapters, missing = load_adapters(frameworks, args.device)
    t_frameworks = time.perf_counter()
    if not adapters:
        raise UsageError("no framework is available: " + "; ".join(missing.values()))
    knobs = {fw: knobs[fw] for fw in adapters}
    reference = reference_framework(tuple(adapters))
    if data.synthetic:
        console.print(f"[bold yellow]data: {data.display_name}[/bold yellow]")
    for fw, why in missing.items():
        console.print(f"[yellow]{fw} unavailable ({why}); continuing with {', '.join(adapters)}[/yellow]")
    with console.status("preparing the shared probe batch"):
        probe = make_probe(data, adapters, knobs, reference, args.seed, args.batch_size, args.steps, args.lr)
        tri = Triangulator(adapters, knobs, probe, spec_for(data), reference, stages)
    t_probe = time.perf_counter()
    with console.status("") as status:
        tri.log = lambda message: status.update(message)
        outcomes = tri.run()
    report = build_report(args, data, tri, outcomes, missing, time.perf_counter() - t0)
    report["timing"] = {
        "data_s": round(t_data - t0, 2),
        "framework_imports_s": round(t_frameworks - t_data, 2),
        "probe_s": round(t_probe - t_frameworks, 2),
        "stages_s": {o.stage.name: round(o.seconds, 2) for o in outcomes},
    }
    out = args.out or Path("runs") / f"triangulate-{dt.datetime.now():%Y%m%d-%H%M%S}"
    write_report(report, out)
    print_table(report)
    Console().print(f"report: {out}/report.md, {out}/report.json, {out}/forward_errors.png ({report['seconds']:.1f} s)")
    if args.fail_on_deviation and any(o.verdict != AGREE for o in outcomes):
        return 1
    return 0
