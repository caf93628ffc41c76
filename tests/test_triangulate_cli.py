"""End to end: `python -m arbiter triangulate` and `selftest` on the synthetic stand-in."""

import json
import subprocess
import sys

import pytest


def _arbiter(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "arbiter", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    proc = _arbiter("triangulate", "--dataset", "synthetic", "--preset", "native", "--steps", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "report.json").read_text()), proc, out


def test_aligned_agrees_on_every_stage(tmp_path):
    proc = _arbiter("triangulate", "--dataset", "synthetic", "--preset", "aligned", "--steps", "5", "--out", str(tmp_path), "--fail-on-deviation")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["verdict"] for s in report["stages"]] == ["agree"] * 10
    assert report["synthetic"] is True and "SYNTHETIC" in proc.stdout


def test_native_names_the_expected_deviations(native):
    report, proc, out = native
    found = {(f["framework"], f["knob"]): f["first_stage"] for f in report["findings"] if "knob" in f}
    # the framework-defaults notes: TF's BN epsilon and grayscale weights, PyTorch's
    # symmetric stride-2 padding, PIL's uint8 gray, BN momentum and unbiased running
    # variance, Keras's Adam epsilon, and the two ReduceLROnPlateau conventions
    expected = {
        ("tf", "grayscale_coefficients"): "preprocessing",
        ("torch", "grayscale_rounding"): "preprocessing",
        ("torch", "stride2_padding"): "forward-eval",
        ("tf", "bn_epsilon"): "forward-eval",
        ("torch", "bn_momentum"): "adam-step",
        ("torch", "bn_running_var"): "adam-step",
        ("tf", "adam_epsilon_placement"): "adam-step",
        ("tf", "adam_epsilon"): "adam-step",
        ("torch", "plateau_counting"): "lr-schedule",
        ("tf", "plateau_threshold_mode"): "lr-schedule",
    }
    assert found == expected
    assert not [f for f in report["findings"] if "unexplained" in f]
    torch_pad = next(f for f in report["findings"] if f.get("knob") == "stride2_padding")
    assert torch_pad["first_tensor"] == "down1"  # the first stride-2 conv
    assert set(report["not_testable"]) == {"kernel_init", "bias_init", "shuffle"}
    assert "torch deviates from stage forward-eval (tensor `down1`), explained by `stride2_padding`" in proc.stdout


def test_report_files_and_schema(native):
    report, _, out = native
    for name in ("report.json", "report.md", "forward_errors.png"):
        assert (out / name).stat().st_size > 0
    stage = report["stages"][0]
    assert {"name", "verdict", "deviator", "first_tensor", "pairwise", "tolerance", "explained_by"} <= set(stage)
    assert set(stage["pairwise"]) == {"tf-torch", "tf-flax", "torch-flax"}
    assert {"atol", "rtol", "reason"} <= set(stage["tolerance"])
    assert set(report["versions"]) == {"tf", "torch", "flax"} and report["device"]["torch"]
    assert report["synthetic"] is True
    assert "SYNTHETIC" in (out / "report.md").read_text()


def test_fail_on_deviation_exit_code(tmp_path):
    proc = _arbiter("triangulate", "--dataset", "synthetic", "--preset", "aligned", "--set", "torch.bn_epsilon=1e-5",
                    "--stages", "forward-eval", "--out", str(tmp_path), "--fail-on-deviation")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    (stage,) = report["stages"]
    assert (stage["verdict"], stage["deviator"]) == ("deviates", "torch")
    assert [m["knob"] for m in stage["explained_by"]] == ["bn_epsilon"]


def test_two_frameworks_report_pairwise_only(tmp_path):
    proc = _arbiter("triangulate", "--dataset", "synthetic", "--frameworks", "torch,flax", "--stages", "forward-eval,lr-schedule",
                    "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["verdict"] for s in report["stages"]] == ["differ", "differ"]
    assert "no majority verdict is possible" in proc.stdout


def test_missing_framework_is_reported_not_fatal(tmp_path):
    # tensorflow made unimportable in the child process: the other two still run
    code = (
        "import sys; sys.modules['tensorflow'] = None; from arbiter.cli import main; "
        f"sys.exit(main(['triangulate', '--dataset', 'synthetic', '--stages', 'forward-eval', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frameworks"] == ["torch", "flax"] and "tf" in report["missing_frameworks"]
    assert "tf unavailable" in proc.stdout and "no majority verdict is possible" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "torch.nope=1"], "unknown knob"),
        (["--set", "mxnet.bn_epsilon=1"], "unknown framework"),
        (["--set", "torch.bn_epsilon=abc"], "bad value"),
        (["--frameworks", "tf,caffe"], "unknown framework"),
        (["--stages", "forward,backward"], "unknown stage"),
        (["--batch-size", "0"], "at least 1"),
        (["--dataset", "/nonexistent/file.npz"], "/nonexistent/file.npz"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    proc = _arbiter("triangulate", "--dataset", "synthetic", *args, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("arbiter")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_selftest_quick_finds_every_planted_fault():
    proc = _arbiter("selftest", "--quick", "--json", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["misses"] == 0
    assert len(result["results"]) >= 1 + 7 * 3 + 2  # no-plant check, 7 knobs x 3 frameworks, 2 double plants
