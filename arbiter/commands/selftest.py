"""`python -m arbiter selftest`: plant known faults and check that triangulation finds them."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from arbiter import data as data_mod
from arbiter.knobs import preset
from arbiter.selftest import check_no_false_alarm, check_plant, plants
from arbiter.session import load_adapters, make_probe, parse_frameworks, reference_framework, spec_for
from arbiter.triangulate import Triangulator
from impls.base import DEVICES

NAME = "selftest"
HELP = "plant known faults (each knob flipped in each framework, and pairs of faults) and check the verdicts"
DESCRIPTION = """\
Start from the `aligned` preset, flip each numeric knob in each framework in turn (and plant
two faults at once in different frameworks), and check that triangulation names the right
framework, the right first stage and the right knob; also check that the unplanted aligned
preset raises no alarm. Prints a table; exits 1 on any miss or false alarm.
Runs on the synthetic stand-in by default. --quick checks a representative subset of knobs
(one per kind of stage) instead of all of them."""


def add_arguments(parser):
    data_mod.add_data_arguments(parser)
    parser.set_defaults(dataset="synthetic")
    parser.add_argument("--frameworks", default="tf,torch,flax", help="comma-separated subset of tf,torch,flax")
    parser.add_argument("--quick", action="store_true", help="a representative subset of knobs (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5, help="trajectory length (default 5: the plants show by then)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    from arbiter.cli import UsageError

    t0 = time.perf_counter()
    frameworks = parse_frameworks(args.frameworks)
    data = data_mod.dataset_from_args(args)
    adapters, missing = load_adapters(frameworks, args.device)
    if len(adapters) < 2:
        raise UsageError("the self-test needs at least two frameworks; unavailable: " + "; ".join(missing.values()))
    base = preset("aligned")
    frameworks = tuple(adapters)
    reference = reference_framework(frameworks)
    probe = make_probe(data, adapters, {fw: base for fw in frameworks}, reference, args.seed, 16, args.steps, 1e-3)
    tri = Triangulator(adapters, {fw: base for fw in frameworks}, probe, spec_for(data), reference)
    console = Console(stderr=True)
    results = [check_no_false_alarm(tri, base)]
    todo = plants(frameworks, args.quick)
    with console.status("") as status:
        for i, plant in enumerate(todo, 1):
            status.update(f"plant {i}/{len(todo)}: {plant.label}")
            results.append(check_plant(tri, plant, base))
    misses = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"results": results, "misses": len(misses), "synthetic": data.synthetic}, indent=2, default=str))
    else:
        table = Table(title=f"arbiter selftest ({'quick' if args.quick else 'full'}) — {data.display_name}")
        for col in ("planted fault", "expected (stage: knob)", "found", "result"):
            table.add_column(col, overflow="fold")
        for r in results:
            exp = "; ".join(f"{fw} at {e['stage']}: {e['knob']}" for fw, e in r["expected"].items()) or "every stage agrees"
            got = "; ".join(f"{fw} at {f['stage']}: {', '.join(f['knobs']) or '-'}" for fw, f in r["found"].items()) or ("—" if r["ok"] else "")
            res = "[green]ok[/green]" if r["ok"] else "[red]MISS: " + "; ".join(r["problems"]) + "[/red]"
            table.add_row(r["plant"], exp, got, res)
        Console(width=180).print(table)
        for fw, why in missing.items():
            Console().print(f"[yellow]{fw} unavailable: {why}[/yellow]")
        Console().print(f"{len(results) - len(misses)}/{len(results)} plants ok, {len(misses)} misses, {time.perf_counter() - t0:.1f} s")
    return 1 if misses else 0
