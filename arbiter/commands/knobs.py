"""`python -m arbiter knobs`: every convention the frameworks differ on, and the presets."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from arbiter.knobs import KNOB_FIELDS, PRESETS, show_value

NAME = "knobs"
HELP = "list every knob: meaning, allowed values, and each preset's value"
DESCRIPTION = """\
List every knob the implementations honour, with its meaning, allowed values and the value
each preset gives it. Presets: tf-native (a Keras user's defaults), torch-native (a typical
PyTorch port), flax-native (the explicit reference), aligned (one shared choice).
Override one knob of one framework elsewhere with --set FRAMEWORK.KNOB=VALUE."""


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def run(args) -> int:
    rows = []
    for name, f in KNOB_FIELDS.items():
        meta = f.metadata
        allowed = ", ".join(meta["choices"]) if meta["choices"] else meta["kind"]
        rows.append(
            {
                "knob": name,
                "meaning": meta["meaning"],
                "allowed": allowed,
                "scope": meta["scope"],
                "presets": {p: PRESETS[p].to_dict()[name] for p in PRESETS},
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="arbiter knobs", show_lines=True)
    for col in ("knob", "meaning", "allowed", *PRESETS):
        table.add_column(col, overflow="fold")
    for name, row in zip(KNOB_FIELDS, rows):
        scope = "" if row["scope"] == "numeric" else f" [{row['scope']}]"
        table.add_row(name + scope, row["meaning"], row["allowed"], *(show_value(getattr(PRESETS[p], name)) for p in PRESETS))
    Console(width=200).print(table)
    return 0
