"""`python -m arbiter data`: fetch (when needed) and validate a dataset, then summarise it."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from arbiter.data import SPLITS, Dataset, add_data_arguments, class_counts, dataset_from_args, majority_accuracy

NAME = "data"
HELP = "download (if needed), validate and summarise a dataset"
DESCRIPTION = """\
Load the dataset every other command would use with the same --dataset/--data-root/--size:
a MedMNIST file is downloaded into --data-root when missing and checked against medmnist's
MD5; 'synthetic' writes the DermaMNIST-format stand-in once; a path is validated as a
MedMNIST-layout .npz. Prints the file, its md5 (the key the ledger files runs under), the
split sizes, the class counts per split and the test accuracy of always answering the
training set's majority class: the floor any trained model must beat."""


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def summary(dataset: Dataset) -> dict:
    counts = class_counts(dataset)
    return {
        "name": dataset.name,
        "synthetic": dataset.synthetic,
        "path": str(dataset.path),
        "md5": dataset.md5,
        "image_shape": list(dataset.images["train"].shape[1:]),
        "num_classes": dataset.num_classes,
        "split_sizes": {split: int(len(dataset.labels[split])) for split in SPLITS},
        "class_counts": {split: counts[split].tolist() for split in SPLITS},
        "label_names": list(dataset.label_names),
        "majority_test_accuracy": majority_accuracy(dataset, "test"),
    }


def _table(dataset: Dataset, info: dict) -> Table:
    table = Table(title="class counts", title_justify="left")
    table.add_column("class", justify="right")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    names = info["label_names"] or [str(c) for c in range(dataset.num_classes)]
    for c, name in enumerate(names):
        table.add_row(str(c), name, *(str(info["class_counts"][split][c]) for split in SPLITS))
    table.add_section()
    table.add_row("", "total", *(str(info["split_sizes"][split]) for split in SPLITS))
    return table


def run(args) -> int:
    dataset = dataset_from_args(args)
    info = summary(dataset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console(width=120, soft_wrap=True)
    if dataset.synthetic:
        console.print("[bold yellow]SYNTHETIC stand-in[/] for DermaMNIST: generated data, not real images", highlight=False)
    h, w, c = info["image_shape"]
    console.print(f"dataset   {dataset.display_name}", highlight=False)
    console.print(f"path      {info['path']}", highlight=False, markup=False)
    console.print(f"md5       {info['md5']}", highlight=False)
    console.print(f"images    {h}x{w}, {c} channel{'s' if c > 1 else ''}, {dataset.num_classes} classes", highlight=False)
    sizes = ", ".join(f"{split} {info['split_sizes'][split]}" for split in SPLITS)
    console.print(f"splits    {sizes}", highlight=False)
    console.print(f"majority  {info['majority_test_accuracy']:.2%} test accuracy (always the training set's most frequent class)", highlight=False)
    console.print(_table(dataset, info))
    return 0
