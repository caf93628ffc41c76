"""Planted faults: does triangulation name the right framework, stage and knob?

Starting from the `aligned` preset in every framework, each numeric knob is flipped in
each framework in turn (one plant), plus plants with two faults at once in different
frameworks. For each plant the expected answer follows from the stage definitions: the
first stage that reads the knob must be the first that does not agree, the planted
framework must be named, and attribution must explain it by exactly the planted knob.
Under the unplanted `aligned` preset every stage must agree (no false alarm).
"""

from __future__ import annotations

from dataclasses import dataclass

from arbiter.compare import AGREE, DEVIATES
from arbiter.knobs import Knobs, show_value
from arbiter.stages import STAGES

# The planted value of each numeric knob (aligned's value -> this). Realistic faults:
# each is the value some framework or port actually uses.
FLIPS = {
    "input_scaling": "symmetric",
    "grayscale_coefficients": (0.2989, 0.587, 0.114),
    "grayscale_rounding": "uint8",
    "eval_augmentation": True,
    "gabor_normalization": "none",
    "stride2_padding": "symmetric",
    "bn_relu_order": "relu_bn",
    "bn_epsilon": 1e-5,
    "bn_momentum": 0.9,
    "bn_running_var": "unbiased",
    "loss": "clipped_probs",
    "adam_epsilon": 1e-8,
    "adam_epsilon_placement": "uncorrected",
    "plateau_patience": 5,
    "plateau_counting": "torch",
    "plateau_threshold_mode": "rel",
    "plateau_min_delta": 1e-2,
    "plateau_factor": 0.5,
    "plateau_cooldown": 2,
}
# A plant may need a setting in every framework to be visible at all: eval-time
# augmentation does nothing unless there is a training augmentation to apply.
PREREQUISITES = {"eval_augmentation": {"train_augmentation": "hflip"}}

QUICK_KNOBS = ("grayscale_coefficients", "stride2_padding", "bn_epsilon", "bn_momentum", "loss", "adam_epsilon_placement", "plateau_counting")


@dataclass
class Plant:
    faults: dict[str, dict[str, object]]  # framework -> {knob: planted value}

    @property
    def label(self) -> str:
        return " + ".join(f"{fw}.{k}={show_value(v)}" for fw, kv in self.faults.items() for k, v in kv.items())

    def knobs(self, base: Knobs, frameworks) -> dict[str, Knobs]:
        shared = {}
        for kv in self.faults.values():
            for k in kv:
                shared.update(PREREQUISITES.get(k, {}))
        return {fw: base.replace(**shared, **self.faults.get(fw, {})) for fw in frameworks}

    def expected(self) -> dict[str, tuple[str, str]]:
        """framework -> (knob, first stage that reads it)."""
        out = {}
        for fw, kv in self.faults.items():
            for k in kv:
                out[fw] = (k, next(s.name for s in STAGES if k in s.reads))
        return out


def plants(frameworks, quick: bool) -> list[Plant]:
    knobs = QUICK_KNOBS if quick else tuple(FLIPS)
    out = [Plant({fw: {k: FLIPS[k]}}) for k in knobs for fw in frameworks]
    if len(frameworks) == 3:
        a, b, c = frameworks
        out.append(Plant({a: {"bn_epsilon": FLIPS["bn_epsilon"]}, b: {"stride2_padding": FLIPS["stride2_padding"]}}))
        out.append(Plant({c: {"grayscale_rounding": FLIPS["grayscale_rounding"]}, a: {"bn_momentum": FLIPS["bn_momentum"]}}))
    return out


def check_plant(tri, plant: Plant, base: Knobs) -> dict:
    """Run stages in order until every planted fault has shown; compare with the expectation."""
    knobs = plant.knobs(base, tri.frameworks)
    expected = plant.expected()
    found: dict[str, tuple[str, list[str]]] = {}  # fw -> (first stage, knobs explaining it there)
    problems = []
    last_needed = max(tri.stages.index(next(s for s in tri.stages if s.name == st)) for _, st in expected.values())
    known = []
    for stage in tri.stages[: last_needed + 1]:
        o = tri.run_stage(stage, knobs, known)
        known += o.explained_by
        if o.verdict == AGREE:
            continue
        if len(expected) == 1 and o.judgement.verdict != DEVIATES:
            problems.append(f"{stage.name}: verdict {o.judgement.verdict}, expected deviates")
        if len(expected) == 1 and o.judgement.deviator not in (None, *expected):
            problems.append(f"{stage.name}: named {o.judgement.deviator}")
        if not o.resolved:
            problems.append(f"{stage.name}: attribution did not resolve")
        named = {m.framework for m in o.explained_by + o.carried}
        for fw in named | ({o.judgement.deviator} if o.judgement.deviator else set()):
            if fw not in found:
                found[fw] = (stage.name, [m.knob for m in o.explained_by if m.framework == fw])
    for fw, (knob, stage_name) in expected.items():
        if fw not in found:
            problems.append(f"{fw}.{knob}: never detected (expected at {stage_name})")
            continue
        got_stage, got_knobs = found[fw]
        if got_stage != stage_name:
            problems.append(f"{fw}.{knob}: first seen at {got_stage}, expected {stage_name}")
        if got_knobs != [knob]:
            problems.append(f"{fw}.{knob}: explained by {got_knobs or 'nothing'}")
    false_alarms = [fw for fw in found if fw not in expected]
    problems += [f"false alarm on {fw} at {found[fw][0]}" for fw in false_alarms]
    return {
        "plant": plant.label,
        "expected": {fw: {"knob": k, "stage": s} for fw, (k, s) in expected.items()},
        "found": {fw: {"stage": s, "knobs": ks} for fw, (s, ks) in found.items()},
        "ok": not problems,
        "problems": problems,
    }


def check_no_false_alarm(tri, base: Knobs) -> dict:
    knobs = {fw: base for fw in tri.frameworks}
    bad = []
    for stage in tri.stages:
        o = tri.run_stage(stage, knobs)
        if o.verdict != AGREE:
            bad.append(f"{stage.name}: {o.judgement.verdict} (first tensor {o.judgement.first_tensor(o.judgement.deviator)})")
    return {"plant": "none (aligned)", "expected": {}, "found": {}, "ok": not bad, "problems": bad}
