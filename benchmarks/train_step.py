"""Images per second of one full training step of the model in each framework.

One step = train-mode forward, loss, backward, Adam update and BN running-statistic
update, through each adapter's own `train_step` (a tf.function for Keras, torch.optim for
PyTorch, a jitted optax step for Flax), on random 28x28 gray inputs under the `aligned`
preset. The first call (tracing/compilation) is reported apart from the steady state
(median and IQR over interleaved samples). Timings are measured here, never asserted.

    python benchmarks/train_step.py [--batch-sizes 1,64,256,1024] [--frameworks tf,torch,flax]
                                    [--device auto|cpu|gpu] [--repeats 5] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import common  # noqa: E402
from arbiter.frameworks import load_adapter  # noqa: E402
from arbiter.knobs import PRESETS  # noqa: E402
from arbiter.spec import ModelSpec  # noqa: E402
from arbiter.weights import probe_weights  # noqa: E402
from impls.base import DEVICES, FrameworkUnavailable  # noqa: E402


def step_timer(adapter, batch: int, seed: int = 0) -> common.Timer:
    spec = ModelSpec()
    model = adapter.build(spec, PRESETS["aligned"], seed)
    adapter.import_weights(model, probe_weights(spec, seed))
    optimizer = adapter.make_optimizer(model, 1e-3)
    rng = np.random.default_rng(seed)
    x = rng.random((batch, spec.image_size, spec.image_size, 1), dtype=np.float32)
    y = rng.integers(0, spec.num_classes, batch)
    # train_step returns the loss as a Python float: it has synchronised with the device
    return common.Timer(lambda: adapter.train_step(model, optimizer, x, y), warmup_s=1.0, min_sample_s=0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64,256,1024")
    parser.add_argument("--frameworks", default="tf,torch,flax")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    parser.add_argument("--quick", action="store_true", help="batch sizes 1 and 8, 2 repeats (smoke test)")
    args = parser.parse_args(argv)
    batches = [1, 8] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    frameworks = args.frameworks.split(",")

    adapters, missing = {}, {}
    for fw in frameworks:
        try:
            adapters[fw] = load_adapter(fw, args.device)
        except FrameworkUnavailable as err:
            missing[fw] = str(err)
            print(f"skipping {fw}: {err}", file=sys.stderr)

    rows = []
    with common.progress_bar(len(batches) * len(adapters), "train step") as bar:
        for batch in batches:
            timers = {fw: step_timer(a, batch) for fw, a in adapters.items()}
            for timer in timers.values():
                timer.first_call()
                timer.warm_up()
            samples = common.interleaved_samples(timers, repeats)
            for fw, timer in timers.items():
                median = samples[fw]["median"]
                rows.append({
                    "framework": fw,
                    "device": adapters[fw].environment()["device"],
                    "batch": batch,
                    "first_call_s": timer.first_call_s,
                    "step_s_median": median,
                    "step_s_iqr": samples[fw]["iqr"],
                    "images_per_s": batch / median,
                })
                bar.advance(status=f"{fw} batch {batch}: {batch / median:,.0f} img/s")

    result = {"environment": common.environment(), "missing_frameworks": missing, "points": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "train_step.json", result)
    table = common.markdown_table(rows, [("framework", "framework"), ("batch", "batch"), ("first call s", "first_call_s"),
                                         ("step s (median)", "step_s_median"), ("IQR s", "step_s_iqr"), ("images/s", "images_per_s")])
    (args.out / "train_step.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
