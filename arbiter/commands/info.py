"""`python -m arbiter info`: which frameworks are usable here, their versions and devices,
and the model's parameter count as each framework counts it."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from arbiter.frameworks import FRAMEWORKS, load_adapter
from arbiter.knobs import NATIVE_PRESET, preset
from arbiter.spec import ModelSpec, trainable_parameter_count
from impls.base import DEVICES, FrameworkUnavailable

NAME = "info"
HELP = "frameworks available here, versions, devices, parameter counts"
DESCRIPTION = """\
Show which of the three frameworks can run here (and why not, for those that cannot), their
versions, the device each one uses, and the trainable parameter count of the model as each
framework counts it (it must equal the spec's count in all three)."""


def add_arguments(parser):
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device to use (default: the accelerator if present)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    spec = ModelSpec()
    expected = trainable_parameter_count(spec)
    report = {"spec_parameter_count": expected, "frameworks": {}}
    for key in FRAMEWORKS:
        try:
            adapter = load_adapter(key, args.device)
            model = adapter.build(spec, preset(NATIVE_PRESET[key]), seed=0)
            env = adapter.environment()
            report["frameworks"][key] = {
                "available": True,
                "parameter_count": adapter.parameter_count(model),
                "versions": env["versions"],
                "device": env["device"],
            }
        except FrameworkUnavailable as err:
            report["frameworks"][key] = {"available": False, "reason": str(err)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"arbiter: frameworks (spec: {expected:,} trainable parameters)")
    for col in ("framework", "status", "parameters", "device", "versions"):
        table.add_column(col, overflow="fold")
    for key, row in report["frameworks"].items():
        if row["available"]:
            count = row["parameter_count"]
            mark = "" if count == expected else "  MISMATCH"
            versions = ", ".join(f"{k} {v}" for k, v in row["versions"].items())
            table.add_row(key, "available", f"{count:,}{mark}", row["device"], versions)
        else:
            table.add_row(key, "UNAVAILABLE", "-", "-", row["reason"])
    Console(width=160).print(table)
    mismatched = [k for k, r in report["frameworks"].items() if r["available"] and r["parameter_count"] != expected]
    return 1 if mismatched else 0
