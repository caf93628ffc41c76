"""`python -m arbiter ablate`: how many accuracy points each knob is worth.

Moves framework F's knobs toward framework G's values (or toward the majority value of
the three frameworks' knobs), one at a time and cumulatively, retrains every variant
over the seeds, and reports each knob's effect on test accuracy and how much of the gap
F -> G the moved knobs close together.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from arbiter.commands.compare import add_sweep_arguments, command_line, default_out, run_sweep
from arbiter.commands.train import add_preset_arguments, add_schedule_arguments, config_from_args, knobs_for
from arbiter.data import add_data_arguments
from arbiter.frameworks import FRAMEWORK_KEYS
from arbiter.knobs import KNOB_NAMES, Knobs, show_value

NAME = "ablate"
HELP = "move one framework's knobs toward another's (or the majority's), retrain, and attribute the accuracy gap"
DESCRIPTION = """\
Starting from framework F with its knobs (--preset, --set), move each knob on which F
differs from the target to the target's value, one at a time and cumulatively (in knob
order, or the order of --knobs), and retrain every variant for every seed. The target is
framework G's knobs (--toward G; G itself is also trained, for the gap) or, by default,
the majority value of each knob across the three frameworks' knobs (the gap is then to
the mean of the other frameworks). Reports the gap, the points each knob moves alone
(with a Welch test against F), the cumulative curve, and the share of the gap closed by
the moved knobs together. Every run is an ordinary ledger run: a repeated ablation, or
one that shares runs with a comparison, trains nothing twice.

examples:
  python -m arbiter ablate --framework torch --toward tf --dataset synthetic --seeds 3
  python -m arbiter ablate --framework tf --knobs stride2_padding,bn_momentum --seeds 5"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", required=True, choices=FRAMEWORK_KEYS, help="the framework whose knobs move (F)")
    parser.add_argument("--toward", choices=(*FRAMEWORK_KEYS, "majority"), default="majority",
                        help="target: another framework's knobs, or the majority value of each knob (default)")
    parser.add_argument("--knobs", default=None, help="comma-separated knobs to move (default: every knob that differs)")
    parser.add_argument("--no-cumulative", action="store_true", help="only move knobs one at a time")
    add_sweep_arguments(parser)
    add_preset_arguments(parser)
    add_schedule_arguments(parser)
    add_data_arguments(parser)


def majority_knobs(all_knobs: dict[str, Knobs], base: Knobs) -> tuple[Knobs, list[str]]:
    """Each knob's most common value across frameworks; a knob with no majority (all
    values different) keeps `base`'s value and is listed."""
    values, tied = {}, []
    for name in KNOB_NAMES:
        counts = Counter(getattr(k, name) for k in all_knobs.values())
        value, count = counts.most_common(1)[0]
        if count * 2 > len(all_knobs):
            values[name] = value
        else:
            values[name] = getattr(base, name)
            tied.append(name)
    return Knobs(**values), tied


def plan(base: Knobs, target: Knobs, only: list[str] | None, cumulative: bool) -> tuple[list[str], dict[str, Knobs]]:
    """(moved knobs in order, {variant name: knobs}). Variants: 'baseline', '+knob'
    (alone), and '..knob' (every knob up to and including it)."""
    differing = base.differences(target)
    if only is not None:
        unknown = [k for k in only if k not in KNOB_NAMES]
        if unknown:
            raise ValueError(f"unknown knob(s) {', '.join(unknown)}")
        moved = [k for k in only if k in differing]
    else:
        moved = differing
    variants = {"baseline": base}
    for k in moved:
        variants[f"+{k}"] = base.replace(**{k: getattr(target, k)})
    if cumulative:
        knobs = base
        for k in moved:
            knobs = knobs.replace(**{k: getattr(target, k)})
            variants[f"..{k}"] = knobs
    return moved, variants


def _mean(rows) -> float:
    return float(np.mean([r.test_acc for r in rows])) if rows else float("nan")


def analyse(db: Path, framework: str, moved: list[str], groups: dict[str, list[str]], reference: list[str] | None,
            base: Knobs, target: Knobs) -> dict:
    from arbiter import stats
    from arbiter.commands.compare import gather

    data = gather(db, {**groups, **({"reference": reference} if reference else {})})
    acc = {name: [r.test_acc for r in d["rows"]] for name, d in data.items()}
    base_acc = acc["baseline"]
    gap = (stats.mean(acc["reference"]) - stats.mean(base_acc)) if reference and acc.get("reference") and base_acc else None
    rows = []
    for k in moved:
        single = acc.get(f"+{k}", [])
        cum = acc.get(f"..{k}", [])
        w = stats.welch(single, base_acc, f"+{k}", "baseline") if single and base_acc else None
        rows.append({
            "knob": k,
            "from": show_value(getattr(base, k)),
            "to": show_value(getattr(target, k)),
            "single": 100 * (stats.mean(single) - stats.mean(base_acc)) if single and base_acc else None,
            "single_sd": 100 * np.sqrt(stats.std(single) ** 2 / max(len(single), 1) + stats.std(base_acc) ** 2 / max(len(base_acc), 1))
            if single and base_acc else None,
            "single_p": w.p if w else None,
            "single_n": len(single),
            "cumulative": 100 * (stats.mean(cum) - stats.mean(base_acc)) if cum and base_acc else None,
            "cumulative_acc": 100 * stats.mean(cum) if cum else None,
            "failed": bool(groups.get(f"+{k}")) and not single,
        })
    last = next((r["cumulative"] for r in reversed(rows) if r["cumulative"] is not None), None)
    all_rows = [r for d in data.values() for r in d["rows"]]
    return {
        "framework": framework,
        "baseline": stats.summarise(base_acc).to_dict() if base_acc else None,
        "reference": stats.summarise(acc["reference"]).to_dict() if reference and acc.get("reference") else None,
        "gap_points": 100 * gap if gap is not None else None,
        "closed_points": last,
        "closed_fraction": (last / (100 * gap)) if (last is not None and gap) else None,
        "knobs": rows,
        "synthetic": any(r.synthetic for r in all_rows),
        "dataset": sorted({f"{r.dataset} (md5 {r.dataset_md5})" for r in all_rows}),
        "runs": {name: [{"run_id": r.run_id, "seed": r.seed, "test_acc": r.test_acc} for r in d["rows"]] for name, d in data.items()},
        "missing": {name: d["missing"] for name, d in data.items() if d["missing"]},
    }


def _fmt(x, spec="+.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def ablation_table(result: dict) -> str:
    lines = ["| knob | from -> to | alone (points) | +-se | p vs baseline | cumulative (points) | cumulative acc (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["knobs"]:
        note = " (runs failed: knob not supported?)" if r["failed"] else ""
        lines.append(f"| {r['knob']}{note} | {r['from']} -> {r['to']} | {_fmt(r['single'])} | {_fmt(r['single_sd'], '.2f')} | "
                     f"{_fmt(r['single_p'], '.3f')} | {_fmt(r['cumulative'])} | {_fmt(r['cumulative_acc'], '.2f')} |")
    return "\n".join(lines)


def summary_sentence(result: dict) -> str:
    parts = []
    base = result["baseline"]
    if base:
        parts.append(f"{result['framework']} baseline {100 * base['mean']:.2f}% (n={base['n']})")
    if result["gap_points"] is not None:
        ref = result["reference"]
        parts.append(f"target {100 * ref['mean']:.2f}%: the gap is {result['gap_points']:+.2f} points")
    effects = [r for r in result["knobs"] if r["single"] is not None]
    noted = [f"{r['knob']} {r['single']:+.2f}" + ("" if (r["single_p"] is not None and r["single_p"] < 0.05) else " (within noise)")
             for r in sorted(effects, key=lambda r: -abs(r["single"]))]
    if noted:
        parts.append("moved alone: " + ", ".join(noted))
    if result["closed_points"] is not None:
        frac = f" ({100 * result['closed_fraction']:.0f}% of the gap)" if result["closed_fraction"] is not None else ""
        parts.append(f"all moved knobs together: {result['closed_points']:+.2f} points{frac}")
    return "; ".join(parts) + "."


def write_report(result: dict, out: Path, command: str, settings: dict) -> None:
    from arbiter import plots

    out.mkdir(parents=True, exist_ok=True)
    synthetic = result["synthetic"]
    fig = plots.ablation_bars(result["knobs"], out / "ablation.png", synthetic, result["gap_points"]).name
    result["figures"] = {"ablation": fig}
    result["command"], result["settings"] = command, settings
    tag = " — SYNTHETIC data" if synthetic else ""
    md = [
        f"# Knob ablation: {result['framework']} toward {settings['toward']}{tag}",
        "",
        f"Command: `{command}`",
        "",
        f"Dataset: {', '.join(result['dataset'])}" + (" — **SYNTHETIC stand-in, not DermaMNIST**" if synthetic else ""),
        f"Settings: {settings['epochs']} epochs, batch size {settings['batch_size']}, lr {settings['learning_rate']}, "
        f"seeds {settings['seeds']}",
        "",
        summary_sentence(result),
        "",
        "Effect on test accuracy (points; mean over seeds minus the baseline's mean):",
        "",
        ablation_table(result),
        "",
    ]
    if settings.get("equal"):
        md += [f"Asked for but already equal to the target (not moved): {', '.join(settings['equal'])}", ""]
    if settings.get("tied"):
        md += [f"Knobs with no majority value (not moved): {', '.join(settings['tied'])}", ""]
    if result["missing"]:
        md += [f"Runs not finished (excluded): {json.dumps(result['missing'])}", ""]
    md += [f"![ablation]({fig})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float))


def run(args: argparse.Namespace) -> int:
    from arbiter.cli import UsageError
    from arbiter.data import dataset_from_args

    fw = args.framework
    if args.toward == fw:
        raise UsageError("--toward names the framework being ablated")
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    base = knobs_for(fw, args.preset, args.overrides)
    all_knobs = {k: knobs_for(k, args.preset, args.overrides) for k in FRAMEWORK_KEYS}
    tied: list[str] = []
    if args.toward == "majority":
        target, tied = majority_knobs(all_knobs, base)
        reference_fws = [k for k in FRAMEWORK_KEYS if k != fw]
    else:
        target = all_knobs[args.toward]
        reference_fws = [args.toward]
    only = [k.strip() for k in args.knobs.split(",")] if args.knobs else None
    try:
        moved, variants = plan(base, target, only, not args.no_cumulative)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not moved:
        raise UsageError(f"{fw}'s knobs already equal the target's" + (f" on {', '.join(only)}" if only else ""))
    equal = [k for k in (only or []) if k not in moved]  # asked for, but nothing to move
    if equal:
        print(f"arbiter ablate: {fw} already has the target's value of {', '.join(equal)}: not moved", file=sys.stderr)
    data = dataset_from_args(args)
    out = default_out(args, f"ablate-{fw}")
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    configs, groups, reference = [], {name: [] for name in variants}, []
    for seed in seeds:
        for name, knobs in variants.items():
            c = config_from_args(args, fw, seed, knobs, data)
            if c.run_id not in groups[name]:
                groups[name].append(c.run_id)
            configs.append(c)
        for ref in reference_fws:
            c = config_from_args(args, ref, seed, all_knobs[ref], data)
            configs.append(c)
            reference.append(c.run_id)
    unique = list({c.run_id: c for c in configs}.values())  # '..first' is '+first': trained once
    statuses = run_sweep(args, unique, out)
    result = analyse(args.db, fw, moved, groups, reference, base, target)
    result["statuses"] = statuses
    settings = {"toward": args.toward, "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                "seeds": seeds, "preset": args.preset, "overrides": args.overrides, "tied": tied, "moved": moved, "equal": equal,
                "reference_frameworks": reference_fws}
    write_report(result, out, command_line("ablate"), settings)
    print((out / "report.md").read_text())
    print(f"\nreport: {out / 'report.md'}")
    return 0
