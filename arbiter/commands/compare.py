"""`python -m arbiter compare`: train seeds x frameworks, then say whether one framework's
test accuracy is the outlier or all agree within seed noise."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from arbiter.commands.train import add_preset_arguments, add_schedule_arguments, config_from_args, data_args, knobs_for
from arbiter.data import add_data_arguments
from arbiter.frameworks import FRAMEWORK_KEYS

NAME = "compare"
HELP = "train seeds x frameworks and compare test accuracy (mean, CI, Welch tests, verdict)"
DESCRIPTION = """\
Train every framework for every seed (each run its own process, its own checkpoint folder
and ledger row; runs already finished in the ledger are skipped, interrupted ones resume),
then report per framework the mean, standard deviation and bootstrap 95% CI of the test
accuracy, pairwise Welch t-tests, the verdict (which framework is the outlier, or that they
agree within noise) and the minimum detectable difference for the number of seeds used.

Writes report.md, report.json and PNGs (training curves, accuracy distribution, confusion
matrices) into --out; every number in them is read back from the ledger.

examples:
  python -m arbiter compare --dataset synthetic --seeds 3 --epochs 5
  python -m arbiter compare --preset aligned --frameworks tf,torch --seeds 5"""


def frameworks_arg(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in FRAMEWORK_KEYS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"frameworks must be a comma-separated subset of {','.join(FRAMEWORK_KEYS)}")
    return names


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per configuration (default 3)")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/reports/<command>-<time>)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frameworks", type=frameworks_arg, default=FRAMEWORK_KEYS, help="comma-separated (default tf,torch,flax)")
    add_sweep_arguments(parser)
    add_preset_arguments(parser)
    add_schedule_arguments(parser)
    add_data_arguments(parser)


def default_out(args, command: str) -> Path:
    return Path(args.out) if args.out else Path(args.db).parent / "reports" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


class SweepPrinter:
    """One line per run (unless quiet); the children themselves run quietly."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.i = total, quiet, 0
        from rich.console import Console

        self.console = Console(stderr=True)

    def __call__(self, event: str, config, rc) -> None:
        if event in ("skipped", "start"):
            self.i += 1
            self._t0 = time.perf_counter()
        if self.quiet:
            return
        what = f"[{self.i}/{self.total}] {config.framework} seed {config.seed} ({config.run_id})"
        if event == "skipped":
            self.console.print(f"{what}: already finished, skipped")
        elif event == "start":
            self.console.print(f"{what}: training {config.epochs} epochs ...")
        else:
            status = "finished" if rc == 0 else f"FAILED (exit {rc}; see its log)"
            self.console.print(f"{what}: {status} in {time.perf_counter() - self._t0:.0f} s")


def run_sweep(args, configs, out: Path) -> dict[str, str]:
    from arbiter.train import sweep

    printer = SweepPrinter(len(configs), args.quiet)
    return sweep(configs, data_args(args), args.db, quiet=True, log_dir=out / "logs", on_event=printer)


# --------------------------------------------------------------------------------------
# The report, from the ledger
# --------------------------------------------------------------------------------------


def gather(db: Path, groups: dict[str, list[str]]) -> dict[str, dict]:
    """{group: {'rows': finished RunRows, 'epochs': [per-run epoch rows], 'missing': ids}}"""
    from arbiter.ledger import Ledger

    out = {}
    with Ledger(db) as ledger:
        for name, ids in groups.items():
            rows = [r for r in ledger.runs(run_ids=ids) if r.status == "finished"]
            done = {r.run_id for r in rows}
            out[name] = {
                "rows": sorted(rows, key=lambda r: r.seed),
                "epochs": [ledger.epochs(r.run_id) for r in sorted(rows, key=lambda r: r.seed)],
                "missing": [i for i in ids if i not in done],
            }
    return out


def _pts(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def verdict_sentence(result: dict) -> str:
    v, odd = result["verdict"], result["outlier"]
    mdd = result["mdd"]
    mdd_text = f"{100 * mdd:.2f} points" if np.isfinite(mdd) else "undefined (fewer than 2 seeds or no spread)"
    names = list(result["summaries"])
    if v == "deviates":
        others = [n for n in names if n != odd]
        return (f"**{odd} is the outlier**: its test accuracy differs from {' and '.join(others)} (Welch p < "
                f"{result['alpha']}), which agree with each other.")
    if v == "agree":
        return (f"**All frameworks agree within seed noise** (no pairwise Welch test has p < {result['alpha']}). "
                f"With {result['seeds']} seeds per framework only differences of {mdd_text} or more are detected "
                f"with {int(100 * result['power'])}% power: agreement means no gap larger than that, not no gap.")
    if v == "differ":
        return f"**The two frameworks differ** (Welch p < {result['alpha']})."
    if v == "no-majority":
        return ("**No single outlier**: the pairwise tests do not single out one framework (either none agree, or "
                "they form a chain a~b~c with a!~c).")
    return "Only one framework: nothing to compare."


def comparison(db: Path, groups: dict[str, list[str]]) -> dict:
    """Statistics of a seeds x frameworks comparison, read from the ledger."""
    from arbiter import stats

    data = gather(db, groups)
    acc = {fw: [r.test_acc for r in d["rows"]] for fw, d in data.items()}
    auc = {fw: [r.test_auc for r in d["rows"]] for fw, d in data.items()}
    result = stats.compare_groups({fw: v for fw, v in acc.items() if v})
    result["auc"] = {fw: stats.summarise(v).to_dict() for fw, v in auc.items() if v}
    result["runs"] = {
        fw: [{"run_id": r.run_id, "seed": r.seed, "test_acc": r.test_acc, "test_auc": r.test_auc, "best_epoch": r.best_epoch,
              "val_loss": r.val_loss, "wall_time_s": r.wall_time_s, "epochs": r.epochs_done} for r in d["rows"]]
        for fw, d in data.items()
    }
    result["missing"] = {fw: d["missing"] for fw, d in data.items() if d["missing"]}
    rows = [r for d in data.values() for r in d["rows"]]
    result["synthetic"] = any(r.synthetic for r in rows)
    result["dataset"] = sorted({f"{r.dataset} (md5 {r.dataset_md5})" for r in rows})
    result["determinism"] = {fw: d["rows"][0].determinism for fw, d in data.items() if d["rows"]}
    result["versions"] = {fw: d["rows"][0].versions for fw, d in data.items() if d["rows"]}
    result["code_version"] = sorted({r.code_version for r in rows})
    result["majority_rate"] = next((r.final.get("test", {}).get("majority_rate") for r in rows if r.final), None)
    result["seconds_per_epoch"] = {
        fw: float(np.median([e["seconds"] for run in d["epochs"] for e in run[1:]] or [np.nan])) for fw, d in data.items()
    }
    result["_data"] = data
    return result


def comparison_table(result: dict) -> str:
    lines = ["| framework | seeds | test acc mean (%) | std | 95% CI (bootstrap) | test AUC mean | per seed (%) | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for fw, s in result["summaries"].items():
        auc = result["auc"].get(fw, {})
        per_seed = ", ".join(_pts(v) for v in s["values"])
        lines.append(f"| {fw} | {s['n']} | {_pts(s['mean'])} | {_pts(s['std'])} | [{_pts(s['ci_low'])}, {_pts(s['ci_high'])}] | "
                     f"{auc.get('mean', float('nan')):.4f} | {per_seed} | {result['seconds_per_epoch'].get(fw, float('nan')):.1f} |")
    return "\n".join(lines)


def welch_table(result: dict) -> str:
    lines = ["| pair | difference (points) | t | df | p | within noise |", "|---|---|---|---|---|---|"]
    for t in result["welch"]:
        ok = "yes" if not (t["p"] < result["alpha"]) else "**no**"
        lines.append(f"| {t['a']} - {t['b']} | {100 * t['difference']:+.2f} | {t['t']:.2f} | {t['df']:.1f} | {t['p']:.4f} | {ok} |")
    return "\n".join(lines)


def determinism_lines(result: dict) -> list[str]:
    out = []
    for fw, d in result["determinism"].items():
        switches = d.get("switches", {})
        out.append(f"- {fw}: " + "; ".join(f"{k}={v}" for k, v in switches.items()) + (f" | adapter: {d.get('adapter')}" if d.get("adapter") else ""))
    return out


def write_comparison_report(result: dict, out: Path, command_line: str, settings: dict, labels: list[str] | None = None) -> dict:
    from arbiter import plots

    out.mkdir(parents=True, exist_ok=True)
    data = result.pop("_data")
    synthetic = result["synthetic"]
    figures = {}
    figures["curves"] = plots.training_curves({fw: d["epochs"] for fw, d in data.items()}, out / "training_curves.png", synthetic).name
    ci = {fw: (s["ci_low"], s["ci_high"]) for fw, s in result["summaries"].items()}
    figures["accuracy"] = plots.accuracy_distribution({fw: s["values"] for fw, s in result["summaries"].items()},
                                                      out / "accuracy.png", synthetic, ci, result["majority_rate"]).name
    matrices = {fw: np.sum([np.asarray(r.final["test"]["confusion"]) for r in d["rows"]], axis=0) for fw, d in data.items() if d["rows"]}
    if matrices:
        figures["confusion"] = plots.confusion_matrices(matrices, labels or [], out / "confusion.png", synthetic).name
    result["figures"] = figures
    result["command"] = command_line
    result["settings"] = settings
    tag = " — SYNTHETIC data" if synthetic else ""
    md = [
        f"# Training comparison{tag}",
        "",
        f"Command: `{command_line}`",
        "",
        f"Dataset: {', '.join(result['dataset'])}" + (" — **SYNTHETIC stand-in, not DermaMNIST**" if synthetic else ""),
        f"Settings: {settings.get('epochs')} epochs, batch size {settings.get('batch_size')}, lr {settings.get('learning_rate')}, "
        f"preset {settings.get('preset')}" + (f", overrides {settings['overrides']}" if settings.get("overrides") else ""),
        "",
        "Test accuracy of the checkpoint chosen by validation loss (MedMNIST ACC), per framework over seeds:",
        "",
        comparison_table(result),
        "",
        "Pairwise Welch t-tests (two-sided):",
        "",
        welch_table(result),
        "",
        f"Verdict: {verdict_sentence(result)}",
        "",
        f"Minimum detectable difference ({result['seeds']} seeds per framework, alpha {result['alpha']}, power "
        f"{result['power']}, two-sample t-test, pooled per-seed sd {_pts(result['pooled_sd'])} points): "
        f"**{_pts(result['mdd'])} points** ({result['mde_effect']:.2f} sd).",
        "",
    ]
    if result["majority_rate"] is not None:
        md += [f"Majority-class rate on test: {100 * result['majority_rate']:.2f}%.", ""]
    if result["missing"]:
        md += [f"Runs not finished (excluded): {json.dumps(result['missing'])}", ""]
    md += ["Determinism switches (from the ledger):", "", *determinism_lines(result), "",
           f"Code version: {', '.join(result['code_version'])}", ""]
    md += [f"![training curves]({figures['curves']})", "", f"![accuracy]({figures['accuracy']})", ""]
    if "confusion" in figures:
        md += [f"![confusion matrices]({figures['confusion']})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def command_line(argv_hint: str) -> str:
    import sys

    return "python -m arbiter " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else argv_hint


def run(args: argparse.Namespace) -> int:
    from arbiter.cli import UsageError
    from arbiter.data import dataset_from_args

    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    data = dataset_from_args(args)
    out = default_out(args, "compare")
    configs, groups = [], {fw: [] for fw in args.frameworks}
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        for fw in args.frameworks:
            config = config_from_args(args, fw, seed, knobs_for(fw, args.preset, args.overrides), data)
            configs.append(config)
            groups[fw].append(config.run_id)
    statuses = run_sweep(args, configs, out)
    result = comparison(args.db, groups)
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr, "preset": args.preset,
                "overrides": args.overrides, "seeds": list(range(args.seed_start, args.seed_start + args.seeds)),
                "frameworks": list(args.frameworks)}
    result["statuses"] = statuses
    result = write_comparison_report(result, out, command_line("compare"), settings, data.label_names)
    print((out / "report.md").read_text())
    print(f"\nreport: {out / 'report.md'}")
    return 0
