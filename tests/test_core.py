"""Framework-neutral pieces: spec, knobs, Gabor bank, padding."""

import json
import subprocess
import sys

import chex
import numpy as np
import pytest

from arbiter import gabor, knobs, padding, spec


def test_parameter_count_is_in_the_papers_range():
    count = spec.trainable_parameter_count(spec.ModelSpec())
    assert count == 328_991
    assert 250_000 <= count <= 450_000


def test_weight_shapes_are_canonical_layouts():
    shapes = spec.weight_shapes(spec.ModelSpec())
    assert shapes["stem.conv.kernel"] == (3, 3, 32, 32)  # HWIO: Gabor's 32 channels in
    assert shapes["head.kernel"] == (96, 7)  # dense (in, out)
    assert shapes["block2.se.reduce.kernel"] == (96, 24)
    convs = [n for n in shapes if n.endswith(".conv.kernel") or ".conv1." in n or ".conv2." in n]
    assert not any(n.replace(".kernel", ".bias") in shapes for n in convs), "convs before BN carry no bias"


class TestGaborBank:
    bank = gabor.gabor_bank(spec.GaborSpec())

    def test_shape_dtype(self):
        chex.assert_shape(self.bank, (7, 7, 1, 32))
        assert self.bank.dtype == np.float32

    def test_l2_normalised_and_zero_mean(self):
        flat = self.bank.reshape(-1, 32).astype(np.float64)
        # float32 rounding of 49 taps: norms within a few ulp of 1
        chex.assert_trees_all_close(np.linalg.norm(flat, axis=0), np.ones(32), atol=1e-6)
        chex.assert_trees_all_close(flat.sum(axis=0), np.zeros(32), atol=1e-6)

    def test_normalisation_off_keeps_raw_scale(self):
        raw = gabor.gabor_bank(spec.GaborSpec(), normalization="none").reshape(-1, 32)
        assert not np.allclose(np.linalg.norm(raw, axis=0), 1.0)
        # normalising the raw bank gives the normalised one: normalisation is the only difference
        chex.assert_trees_all_close(raw / np.linalg.norm(raw, axis=0), self.bank.reshape(-1, 32), atol=1e-6)

    def test_even_filters_are_point_symmetric(self):
        k = self.bank[:, :, 0, :]
        chex.assert_trees_all_close(k, k[::-1, ::-1, :], atol=1e-7)

    def test_orientation_rotates_the_kernel(self):
        # theta=0 (channel 0) and theta=pi/2 (channel 4 of 8) are transposes of each other
        # when the envelope is rotated with the carrier (gamma applies to y' in both)
        k0, k90 = self.bank[:, :, 0, 0], self.bank[:, :, 0, 4]
        chex.assert_trees_all_close(k0, k90.T, atol=1e-6)

    def test_low_then_high_frequency_groups(self):
        rows = gabor.channel_table(spec.GaborSpec())
        assert [r["group"] for r in rows] == ["low"] * 16 + ["high"] * 16
        # the high-frequency group has more energy at high spatial frequencies
        power = np.abs(np.fft.fft2(self.bank[:, :, 0, :], s=(32, 32), axes=(0, 1))) ** 2
        f = np.fft.fftfreq(32)
        radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))[..., None]
        centroid = (power * radius).sum((0, 1)) / power.sum((0, 1))
        assert centroid[16:].min() > centroid[:16].max()

    def test_deterministic(self):
        np.testing.assert_array_equal(gabor.gabor_bank(spec.GaborSpec()), self.bank)

    def test_even_kernel_size_rejected(self):
        with pytest.raises(ValueError, match="odd"):
            gabor.gabor_bank(spec.GaborSpec(kernel_size=6))


@pytest.mark.parametrize(
    "size, k, stride, expected",
    [(28, 3, 2, (0, 1)), (14, 3, 2, (0, 1)), (28, 5, 2, (1, 2)), (28, 3, 1, (1, 1)), (7, 3, 2, (1, 1)), (28, 7, 1, (3, 3))],
)
def test_tf_same_padding_split(size, k, stride, expected):
    assert padding.conv_padding(size, k, stride, "tf_same") == expected
    assert padding.conv_padding(size, k, stride, "symmetric") == (k // 2, k // 2)


class TestKnobs:
    def test_presets_round_trip_through_json(self):
        for p in knobs.PRESETS.values():
            assert knobs.Knobs.from_dict(json.loads(p.to_json())) == p

    def test_presets_differ_where_the_notes_say(self):
        tf, torch, flax = (knobs.PRESETS[n] for n in ("tf-native", "torch-native", "flax-native"))
        assert (tf.bn_epsilon, torch.bn_epsilon, flax.bn_epsilon) == (1e-3, 1e-5, 1e-5)
        assert (tf.stride2_padding, torch.stride2_padding) == ("tf_same", "symmetric")
        assert torch.bn_momentum == pytest.approx(0.9)  # torch momentum=0.1 on the new value
        assert (tf.adam_epsilon, tf.adam_epsilon_placement) == (1e-7, "uncorrected")
        assert (torch.bn_running_var, tf.bn_running_var) == ("unbiased", "biased")

    def test_override_parsing(self):
        assert knobs.parse_override("torch.adam_epsilon=1e-7", ("tf", "torch")) == ("torch", "adam_epsilon", 1e-7)
        assert knobs.parse_override("tf.grayscale_coefficients=0.3,0.6,0.1", ("tf",))[2] == (0.3, 0.6, 0.1)
        assert knobs.parse_override("flax.eval_augmentation=on", ("flax",))[2] is True

    @pytest.mark.parametrize(
        "text, message",
        [
            ("torch.nope=1", "unknown knob"),
            ("mxnet.bn_epsilon=1", "unknown framework"),
            ("torch.bn_epsilon", "FRAMEWORK.KNOB=VALUE"),
            ("torch.stride2_padding=valid", "must be one of"),
            ("torch.bn_epsilon=abc", "bad value"),
            ("torch.bn_momentum=1.5", "bn_momentum"),
        ],
    )
    def test_bad_overrides_are_one_clear_error(self, text, message):
        with pytest.raises(knobs.KnobError, match=message):
            knobs.parse_override(text, ("tf", "torch", "flax"))

    def test_differences(self):
        a = knobs.PRESETS["aligned"]
        assert a.differences(a.replace(bn_epsilon=1e-5, loss="clipped_probs")) == ["bn_epsilon", "loss"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "arbiter", *args], capture_output=True, text=True, timeout=300)


def test_cli_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("info", "knobs", "data"):
        assert command in out.stdout


def test_cli_knobs_lists_every_knob_with_presets():
    out = _cli("knobs", "--json")
    assert out.returncode == 0
    rows = json.loads(out.stdout)
    assert [r["knob"] for r in rows] == list(knobs.KNOB_NAMES)
    assert all(set(r["presets"]) == set(knobs.PRESETS) for r in rows)
