"""Writing a triangulation: terminal table, report.json, report.md and an error plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from arbiter.compare import AGREE, pair_key, pairs
from arbiter.knobs import show_value


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def explanation_text(stage: dict) -> str:
    parts = []
    event = stage.get("roundoff_event")
    if event:
        parts.append(f"round-off event on the first batch ({event['deviator'] or event['verdict']} at {event['first_tensor']}), "
                     "not reproduced on an independent batch")
    if stage["verdict"] == AGREE:
        return "; ".join(parts)
    by_fw: dict[str, list[str]] = {}
    for m in stage["explained_by"]:
        by_fw.setdefault(m["framework"], []).append(f"{m['knob']} ({show_value(m['from'])} vs {show_value(m['to'])})")
    for fw, knobs in by_fw.items():
        parts.append(f"{fw}: {', '.join(knobs)}")
    if stage.get("carried"):
        parts.append("also " + ", ".join(f"{m['framework']}.{m['knob']}" for m in stage["carried"]) + " (found earlier)")
    if not stage["attribution_resolved"]:
        parts.append("UNEXPLAINED by the knobs this stage reads")
    return "; ".join(parts)


def finding_sentence(f: dict) -> str:
    if "unexplained" in f:
        u = f["unexplained"]
        who = u["deviator"] or "no single framework"
        return f"stage {u['stage']}: {u['verdict']} ({who}); no knob the stage reads explains it"
    where = f"stage {f['first_stage']}" + (f" (tensor `{f['first_tensor']}`)" if f["first_tensor"] else "")
    return (
        f"{f['framework']} deviates from {where}, explained by `{f['knob']}` "
        f"({show_value(f['value'])} vs {show_value(f['majority_value'])})"
    )


def print_table(report: dict, console: Console | None = None) -> None:
    console = console or Console(width=160)
    frameworks = tuple(report["frameworks"])
    title = f"arbiter triangulate — {report['dataset']['display_name']} — preset {report['preset']}"
    table = Table(title=title)
    for col in ("stage", "verdict", "deviator", "first tensor", *(pair_key(p) for p in pairs(frameworks)), "explanation"):
        table.add_column(col, overflow="fold")
    for s in report["stages"]:
        style = "green" if s["verdict"] == AGREE else "red"
        errs = [f"{_fmt(s['pairwise'][pair_key(p)]['max_abs'])}{'' if s['pairwise'][pair_key(p)]['agree'] else ' ✗'}" for p in pairs(frameworks)]
        table.add_row(s["name"], f"[{style}]{s['verdict']}[/{style}]", s["deviator"] or "", s["first_tensor"] or "", *errs, explanation_text(s))
    console.print(table)
    console.print("cells: max |a-b| over the stage's tensors; ✗ = outside the stage's tolerance (report.md lists them)")
    if report["dataset"]["synthetic"]:
        console.print("[bold yellow]data: SYNTHETIC stand-in, not DermaMNIST[/bold yellow]")
    for f in report["findings"]:
        console.print("• " + finding_sentence(f))
    if report["not_testable"]:
        console.print("not testable on transferred weights (training-only knobs that differ): " + ", ".join(report["not_testable"]))
    for fw, why in report.get("missing_frameworks", {}).items():
        console.print(f"[yellow]{fw} unavailable: {why}[/yellow]")
    if len(frameworks) < 3:
        console.print("[yellow]fewer than three frameworks: pairwise differences only, no majority verdict is possible[/yellow]")


def write_markdown(report: dict, path: Path) -> None:
    frameworks = tuple(report["frameworks"])
    lines = [f"# Triangulation report — preset `{report['preset']}`", ""]
    if report["dataset"]["synthetic"]:
        lines += ["> **Data: SYNTHETIC stand-in in DermaMNIST's format — not the real DermaMNIST.**", ""]
    lines += [
        f"- dataset: {report['dataset']['display_name']} (md5 {report['dataset']['md5']})",
        f"- batch: {report['batch_size']} images of the train split, seed {report['seed']}; trajectory {report['trajectory_steps']} steps; lr {report['learning_rate']}",
        f"- reference framework (shared model input, tie-breaking value): {report['reference']}",
        "",
        "## Findings",
        "",
    ]
    lines += [f"- {finding_sentence(f)}" for f in report["findings"]] or ["- every stage agrees"]
    if report["not_testable"]:
        lines += ["", f"Not testable on transferred weights (training-only knobs that differ): {', '.join(report['not_testable'])}"]
    lines += ["", "## Stages", "", "| stage | verdict | deviator | first tensor | " + " | ".join(pair_key(p) for p in pairs(frameworks)) + " | tolerance | explanation |"]
    lines.append("|" + "---|" * (6 + len(pairs(frameworks))))
    for s in report["stages"]:
        errs = [f"{_fmt(s['pairwise'][pair_key(p)]['max_abs'])} / {_fmt(s['pairwise'][pair_key(p)]['max_rel'])}" for p in pairs(frameworks)]
        tol = f"atol {s['tolerance']['atol']:g}, rtol {s['tolerance']['rtol']:g}"
        lines.append(f"| {s['name']} | {s['verdict']} | {s['deviator'] or ''} | {s['first_tensor'] or ''} | " + " | ".join(errs) + f" | {tol} | {explanation_text(s)} |")
    lines += ["", "Cells: max abs / max relative difference over the stage's tensors.", "", "### Tolerances and why", ""]
    lines += [f"- **{s['name']}**: atol {s['tolerance']['atol']:g}, rtol {s['tolerance']['rtol']:g} — {s['tolerance']['reason']}" for s in report["stages"]]
    lines += ["", "## Settings per framework", "", "| knob | " + " | ".join(frameworks) + " |", "|" + "---|" * (1 + len(frameworks))]
    for knob in report["settings"][frameworks[0]]:
        vals = [show_value(report["settings"][fw][knob]) for fw in frameworks]
        mark = " **≠**" if len(set(vals)) > 1 else ""
        lines.append(f"| {knob}{mark} | " + " | ".join(vals) + " |")
    lines += ["", "## Environment", ""]
    for fw, env in report["environment"].items():
        lines.append(f"- **{fw}**: device {env.get('device')}; precision: {env.get('precision')}; determinism: {env.get('determinism')}; " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()))
    path.write_text("\n".join(lines) + "\n")


def plot_forward_errors(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = tuple(report["frameworks"])
    stages = {s["name"]: s for s in report["stages"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, name in zip(axes, ("forward-eval", "forward-train")):
        if name not in stages:
            continue
        tensors = list(stages[name]["per_tensor"])
        for p in pairs(frameworks):
            vals = [max(stages[name]["per_tensor"][t][pair_key(p)]["max_abs"], 1e-12) for t in tensors]
            ax.semilogy(range(len(tensors)), vals, marker="o", label=pair_key(p))
        ax.axhline(stages[name]["tolerance"]["atol"], color="gray", ls="--", lw=1, label="atol")
        ax.set_xticks(range(len(tensors)), tensors, rotation=45, ha="right")
        ax.set_title(f"{name} ({stages[name]['verdict']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("max |a - b|")
    axes[0].legend()
    synthetic = " — SYNTHETIC data" if report["dataset"]["synthetic"] else ""
    fig.suptitle(f"Per-tensor error across the forward pass, preset {report['preset']}{synthetic}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    write_markdown(report, out / "report.md")
    plot_forward_errors(report, out / "forward_errors.png")
