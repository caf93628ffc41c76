"""The Gabor-conv benchmark: its smoke run's report, and the checks that keep a fast wrong
kernel out of it. No timing is ever asserted: only that timings were taken and reported."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from arbiter.spec import GaborSpec
from numpy_model import conv2d as oracle_conv2d

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gabor_conv.py"

# the formulations the issue asks for, by framework (a worker may add more)
REQUIRED_FORMULATIONS = {
    "jax": {"jit lax.conv NHWC", "jit taps matmul", "jit FFT"},
    "torch": {"eager F.conv2d NCHW", "torch.compile"},
    "tensorflow": {"tf.function", "tf.function(jit_compile=True)"},
}
POINT_FIELDS = {
    "framework", "formulation", "batch", "bank_channels", "image_size", "compile_s", "steady_median_s",
    "steady_iqr_s", "images_per_s", "gflops", "ceiling_fraction", "max_abs_diff", "status",
}


def load_script():
    spec = importlib.util.spec_from_file_location("gabor_conv_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gabor_conv")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gabor_conv.json").read_text()), proc.stdout + proc.stderr


def test_quick_run_writes_json_markdown_and_plots(quick_run):
    out, result, _ = quick_run
    assert {"environment", "config", "ceiling", "points", "workers", "skipped"} <= set(result)
    env = result["environment"]
    assert env["cpu_count"] >= 1 and env["cpu_model"] and env["packages"]["numpy"]
    md = (out / "gabor_conv.md").read_text()
    assert "| framework / formulation |" in md and "ceiling" in md
    for png in ("throughput_vs_batch.png", "ceiling_fraction_vs_batch.png", "sweeps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_quick_run_covers_every_framework_and_formulation(quick_run):
    _, result, log = quick_run
    assert result["skipped"] == [], log[-2000:]
    found: dict[str, set[str]] = {}
    for r in result["points"]:
        found.setdefault(r["framework"], set()).add(r["formulation"])
    for fw, required in REQUIRED_FORMULATIONS.items():
        assert required <= found.get(fw, set()), (fw, found.get(fw))
    # quick mode: batch 1 and 8, the model's bank, 28x28, every formulation at both
    assert {(r["batch"], r["bank_channels"], r["image_size"]) for r in result["points"]} == {
        (1, GaborSpec().channels, 28), (8, GaborSpec().channels, 28)}


def test_every_point_was_checked_equal_and_timed(quick_run):
    _, result, _ = quick_run
    ceiling = result["ceiling"]["gflops"]
    assert ceiling and ceiling > 0
    for r in result["points"]:
        assert POINT_FIELDS <= set(r), POINT_FIELDS - set(r)
        assert r["status"] == "ok", (r["label"], r["status"])
        assert r["max_abs_diff"] <= r["tolerance"] <= 1e-4, (r["label"], r["max_abs_diff"])
        assert r["compile_s"] > 0
        assert r["steady_median_s"] > 0 and r["steady_iqr_s"] >= 0 and r["repeats"] == 2
        assert r["steady_min_s"] <= r["steady_median_s"] <= r["steady_max_s"]
        # derived columns agree with the raw median (relative: float round-off only)
        assert math.isclose(r["images_per_s"], r["batch"] / r["steady_median_s"], rel_tol=1e-9)
        assert math.isclose(r["gflops"], r["flops"] / r["steady_median_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(r["ceiling_fraction"], r["gflops"] / ceiling, rel_tol=1e-9)


def test_flops_are_those_of_the_direct_convolution(bench):
    p = bench.Point(batch=256, channels=32, image=28)
    assert p.flops() == 2 * 256 * 28 * 28 * 32 * 7 * 7 * 1


def test_bank_sizes_vary_orientations_and_frequencies(bench):
    assert bench.bank_spec(32) == GaborSpec()
    for c in (8, 16, 64, 128, 256):
        assert bench.bank_spec(c).channels == c
    assert len(bench.bank_spec(128).low_frequencies) > len(GaborSpec().low_frequencies)


def test_reference_matches_the_numpy_oracle(bench):
    p = bench.Point(batch=3, channels=32, image=12)
    x, bank = bench.make_input(p), bench.make_bank(p)
    ref = bench.reference(x, bank)
    chex.assert_shape(ref, (3, 12, 12, 32))
    # both float64: only summation order differs
    chex.assert_trees_all_close(ref, oracle_conv2d(x.astype(np.float64), bank.astype(np.float64), 1, "tf_same"), atol=1e-12)


class _NumpySection:
    """A stand-in framework: one correct formulation, one with the grid shifted a pixel."""

    def __new__(cls, bench):
        def correct(x, bank):
            return (lambda: bench.reference(x, bank).astype(np.float32)), np.asarray

        def shifted(x, bank):
            return (lambda: np.roll(bench.reference(x, bank), 1, axis=2).astype(np.float32)), np.asarray

        def matmul(n):
            a = np.ones((n, n), np.float32)
            return lambda: a @ a

        return bench.Section("numpy", "default", {}, {"correct": correct, "shifted": shifted}, matmul)


def test_a_wrong_kernel_is_marked_and_not_timed(bench):
    section = _NumpySection(bench)
    plan = {"tolerance": 1e-4, "max_output_mb": 64, "repeats": 2, "matmul_size": 64,
            "timing": {"warmup_s": 0.0, "min_sample_s": 0.0}}
    mm = bench.common.Timer(section.matmul(64), warmup_s=0.0, min_sample_s=0.0)
    mm.warm_up()
    records = {r["formulation"]: r for r in bench.run_point(section, bench.Point(2, 8, 16), plan, mm)}
    assert records["correct"]["status"] == "ok" and records["correct"]["max_abs_diff"] < 1e-6
    assert records["shifted"]["status"] == "mismatch" and records["shifted"]["max_abs_diff"] > 1e-2
    assert "steady_median_s" not in records["shifted"] and records["correct"]["steady_median_s"] > 0


def test_an_oversized_point_is_skipped_with_a_reason(bench):
    section = _NumpySection(bench)
    plan = {"tolerance": 1e-4, "max_output_mb": 1, "repeats": 2, "matmul_size": 64,
            "timing": {"warmup_s": 0.0, "min_sample_s": 0.0}}
    records = bench.run_point(section, bench.Point(64, 32, 64), plan, None)
    assert records and all(r["status"].startswith("skipped: output") for r in records)


def test_rounds_pool_samples_and_keep_the_worst_status(bench):
    section = _NumpySection(bench)
    plan = {"tolerance": 1e-4, "max_output_mb": 64, "repeats": 3, "matmul_size": 64,
            "timing": {"warmup_s": 0.0, "min_sample_s": 0.0}}
    mm = bench.common.Timer(section.matmul(64), warmup_s=0.0, min_sample_s=0.0)
    mm.warm_up()
    rounds = [bench.run_point(section, bench.Point(2, 8, 16), plan, mm) for _ in range(2)]
    # a second round where the 'correct' formulation went wrong must not be averaged away
    rounds[1] = [{**r, "status": "mismatch", "max_abs_diff": 0.5} if r["formulation"] == "correct" else r for r in rounds[1]]
    merged = {r["formulation"]: r for r in bench.merge_rounds(rounds[0] + rounds[1], 64)}
    assert merged["correct"]["status"] == "mismatch" and merged["correct"]["max_abs_diff"] == 0.5
    clean = {r["formulation"]: r for r in bench.merge_rounds(rounds[0] + rounds[0], 64)}
    assert clean["correct"]["status"] == "ok" and clean["correct"]["repeats"] == 6 and clean["correct"]["rounds"] == 2


def test_interleaved_samples_summarise_every_candidate(bench):
    # the summary other benchmark scripts (train_step.py) read: median and IQR per name
    timers = {name: bench.common.Timer(lambda: sum(range(100)), warmup_s=0.0, min_sample_s=0.0) for name in ("a", "b")}
    for t in timers.values():
        t.warm_up()
    stats = bench.common.interleaved_samples(timers, 3)
    assert set(stats) == {"a", "b"}
    for st in stats.values():
        assert st["n"] == 3 and 0 < st["min"] <= st["median"] <= st["max"] and st["iqr"] >= 0
