"""Stage-by-stage triangulation with a 2-of-3 verdict and knob attribution.

For each stage every framework computes the stage's tensors on identical inputs; the
three pairs are compared under the stage's tolerance and judged (arbiter.compare.verdict).
When a stage does not agree, attribution moves the knobs the stage reads, one framework
and one knob at a time, toward the majority's value (the reference framework's where all
three differ), keeps the move that makes the most pairs agree (ties: the largest drop in
error), repeats until the stage agrees or no move helps, then drops any move that the
final agreement does not need. So two frameworks that deviate for different reasons at
the same stage are each explained by their own knob.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from arbiter.compare import AGREE, DEVIATES, pair_error, pair_key, pairs, roundoff_mask, verdict
from arbiter.knobs import Knobs, knob_scope
from arbiter.stages import ROUNDOFF_REFERENCE, STAGES, Probe, Stage, reference_path
from arbiter.spec import ModelSpec


@dataclass
class Judgement:
    verdict: str
    deviator: str | None
    per_tensor: dict[str, dict[str, object]]  # tensor -> pair key -> PairError
    agreeing: dict[tuple[str, str], bool]

    @property
    def score(self) -> tuple[int, float]:
        """More agreeing pairs is better; then less total (log) excess over tolerance."""
        total = 0.0
        for errs in self.per_tensor.values():
            for e in errs.values():
                total += math.log10(max(e.excess, 1.0)) if math.isfinite(e.excess) else 1e6
        return sum(self.agreeing.values()), -total

    def worst(self, pair: tuple[str, str]):
        key = pair_key(pair)
        return max((errs[key] for errs in self.per_tensor.values()), key=lambda e: e.excess)

    def first_tensor(self, framework: str | None) -> str | None:
        """First tensor (pipeline order) where `framework` disagrees with every other one,
        or, for no framework, where any pair disagrees."""
        for tensor, errs in self.per_tensor.items():
            relevant = [e for k, e in errs.items() if framework is None or framework in k.split("-")]
            if relevant and (all(not e.agree for e in relevant) if framework else any(not e.agree for e in relevant)):
                return tensor
        return None


@dataclass
class Move:
    framework: str
    knob: str
    old: object
    new: object
    first_tensor: str | None = None  # where this knob alone makes the framework disagree

    def to_dict(self) -> dict:
        return {"framework": self.framework, "knob": self.knob, "from": _plain(self.old), "to": _plain(self.new), "first_tensor": self.first_tensor}


@dataclass
class StageOutcome:
    stage: Stage
    judgement: Judgement
    explained_by: list[Move] = field(default_factory=list)  # knobs first found at this stage
    carried: list[Move] = field(default_factory=list)  # knobs found at earlier stages that this stage reads too
    resolved: bool = True  # False: attribution could not make the stage agree
    after: Judgement | None = None
    not_testable: list[str] = field(default_factory=list)
    first_tensors: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0
    # a residual deviation that no knob explains and that an independent batch does not
    # reproduce: {"verdict", "deviator", "first_tensor"} on the first batch
    roundoff_event: dict | None = None

    @property
    def verdict(self) -> str:
        """The stage's verdict; a round-off event alone does not make a deviation."""
        if self.roundoff_event and not (self.explained_by or self.carried):
            return AGREE
        return self.judgement.verdict

    def to_dict(self, frameworks) -> dict:
        j = self.judgement
        quiet = self.verdict == AGREE
        return {
            "name": self.stage.name,
            "title": self.stage.title,
            "verdict": self.verdict,
            "deviator": None if quiet else j.deviator,
            "first_tensor": None if quiet else j.first_tensor(j.deviator),
            "roundoff_event": self.roundoff_event,
            "first_tensor_by_framework": self.first_tensors,
            "pairwise": {pair_key(p): j.worst(p).to_dict() for p in pairs(frameworks)},
            "per_tensor": {t: {k: e.to_dict() for k, e in errs.items()} for t, errs in j.per_tensor.items()},
            "tolerance": self.stage.tolerance.to_dict(),
            "reads": list(self.stage.reads),
            "explained_by": [m.to_dict() for m in self.explained_by],
            "carried": [m.to_dict() for m in self.carried],
            "attribution_resolved": self.resolved,
            "verdict_after_attribution": self.after.verdict if self.after else None,
            "not_testable": self.not_testable,
            "seconds": round(self.seconds, 3),
        }


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


class Triangulator:
    def __init__(self, adapters: dict, knobs: dict[str, Knobs], probe: Probe, spec: ModelSpec, reference: str,
                 stages: tuple[Stage, ...] = STAGES, log: Callable[[str], None] = lambda s: None, models: dict | None = None):
        self.adapters = adapters
        self.frameworks = tuple(adapters)
        self.knobs = knobs
        self.probe = probe
        self.spec = spec
        self.reference = reference
        self.stages = stages
        self.log = log
        self._outputs: dict = {}
        self._models: dict = {} if models is None else models  # shared with the replicate
        self._replicate: Triangulator | None = None
        if probe is not None and probe.reference_path is None and any(s.name == "trajectory" for s in stages):
            # built through the model cache, so the trajectory stage reuses this model (and
            # whatever the framework compiled for it)
            model = self._model_factory(reference, knobs[reference])(probe.step_weights)
            probe.reference_path = reference_path(adapters[reference], model, probe.learning_rate, probe.trajectory)

    # -- computing --------------------------------------------------------------------------
    def _model_factory(self, fw: str, knobs: Knobs):
        adapter = self.adapters[fw]

        def new_model(weights=None):
            key = (fw, knobs.to_json())
            if key not in self._models:
                self._models[key] = adapter.build(self.spec, knobs, seed=self.probe.seed)
            model = self._models[key]
            adapter.import_weights(model, self.probe.weights if weights is None else weights)
            return model

        return new_model

    def compute(self, stage: Stage, fw: str, knobs: Knobs) -> dict[str, np.ndarray]:
        key = (stage.name, fw, repr([getattr(knobs, k) for k in stage.reads]))
        if key not in self._outputs:
            self._outputs[key] = stage.compute(self.adapters[fw], self._model_factory(fw, knobs), knobs, self.probe)
        return self._outputs[key]

    def judge(self, stage: Stage, knobs: dict[str, Knobs]) -> Judgement:
        outputs = {fw: self.compute(stage, fw, knobs[fw]) for fw in self.frameworks}
        names = [n for n in next(iter(outputs.values())) if not n.startswith(ROUNDOFF_REFERENCE)]
        per_tensor = {}
        for name in names:
            ref = ROUNDOFF_REFERENCE + (name[2:] if name[:2] in ("m/", "v/") else name)
            per_tensor[name] = {}
            for a, b in pairs(self.frameworks):
                exclude = roundoff_mask(outputs[a][ref], outputs[b][ref]) if ref in outputs[a] and ref in outputs[b] else None
                missing = np.array(np.nan)
                per_tensor[name][pair_key((a, b))] = pair_error(outputs[a].get(name, missing), outputs[b].get(name, missing), stage.tolerance, exclude)
        agreeing = {p: all(errs[pair_key(p)].agree for errs in per_tensor.values()) for p in pairs(self.frameworks)}
        v, dev = verdict(agreeing, self.frameworks)
        return Judgement(v, dev, per_tensor, agreeing)

    # -- attribution ------------------------------------------------------------------------
    def target_value(self, knob: str, knobs: dict[str, Knobs]):
        values = [getattr(knobs[fw], knob) for fw in self.frameworks]
        for v in values:
            if values.count(v) >= 2:
                return v
        return getattr(knobs[self.reference], knob)

    def _candidates(self, stage: Stage, knobs: dict[str, Knobs], judgement: Judgement) -> list[Move]:
        suspects = [judgement.deviator] if judgement.verdict == DEVIATES else list(self.frameworks)
        moves = []
        for fw in suspects:
            for knob in stage.reads:
                target = self.target_value(knob, knobs)
                if getattr(knobs[fw], knob) != target:
                    moves.append(Move(fw, knob, getattr(knobs[fw], knob), target))
        return moves

    def _apply(self, knobs: dict[str, Knobs], moves: list[Move]) -> dict[str, Knobs]:
        out = dict(knobs)
        for m in moves:
            out[m.framework] = out[m.framework].replace(**{m.knob: m.new})
        return out

    def _unchanged(self, stage: Stage, fw: str, a: Knobs, b: Knobs) -> bool:
        x, y = self.compute(stage, fw, a), self.compute(stage, fw, b)
        return all(np.array_equal(x[k], y[k]) for k in x)

    def attribute(self, stage: Stage, knobs: dict[str, Knobs], judgement: Judgement) -> tuple[list[Move], bool, Judgement]:
        """Greedy search from `knobs` (with `judgement` its verdict) for the moves that make
        the stage agree; then the ones the agreement does not need are dropped."""
        applied: list[Move] = []
        current, j = dict(knobs), judgement
        while j.verdict != AGREE:
            best = None
            for move in self._candidates(stage, current, j):
                trial = self._apply(current, [move])
                if self._unchanged(stage, move.framework, current[move.framework], trial[move.framework]):
                    continue
                jt = self.judge(stage, trial)
                if jt.score > j.score and (best is None or jt.score > best[1].score):
                    best = (move, jt)
            if best is None:
                break
            applied.append(best[0])
            current, j = self._apply(current, [best[0]]), best[1]
        resolved = j.verdict == AGREE
        if resolved:  # keep only the moves the agreement needs
            for move in list(applied):
                rest = [m for m in applied if m is not move]
                if self.judge(stage, self._apply(knobs, rest)).verdict == AGREE:
                    applied = rest
        for move in applied:  # where does this knob, alone, show?
            others = [m for m in applied if m is not move]
            move.first_tensor = self.judge(stage, self._apply(knobs, others)).first_tensor(move.framework)
        return applied, resolved, j

    # -- running ------------------------------------------------------------------------------
    def not_testable(self, knobs: dict[str, Knobs]) -> list[str]:
        """Training-only knobs on which the frameworks differ: no numerical stage can show them."""
        names = set()
        for fw in self.frameworks:
            for other in self.frameworks:
                names.update(k for k in knobs[fw].differences(knobs[other]) if knob_scope(k) == "training")
        return sorted(names)

    def run_stage(self, stage: Stage, knobs: dict[str, Knobs] | None = None, known: list[Move] = ()) -> StageOutcome:
        """Judge one stage and attribute its deviations. `knobs` defaults to the run's own
        (the self-test passes planted ones, sharing the output cache across plants).
        `known` are moves found at earlier stages: attribution starts from them, so each
        stage reports only what is new there (and runs the costly stages far fewer times)."""
        knobs = knobs or self.knobs
        t0 = time.perf_counter()
        j = self.judge(stage, knobs)
        outcome = StageOutcome(stage, j, not_testable=self.not_testable(knobs))
        if j.verdict != AGREE and len(self.frameworks) >= 2:
            outcome.carried = [m for m in known if m.knob in stage.reads]
            start = self._apply(knobs, outcome.carried)
            j_start = self.judge(stage, start) if outcome.carried else j
            outcome.explained_by, outcome.resolved, outcome.after = self.attribute(stage, start, j_start)
            if not outcome.resolved:
                self._check_replicate(stage, self._apply(start, outcome.explained_by), outcome)
        deviators = {m.framework for m in outcome.explained_by + outcome.carried} | ({j.deviator} if j.deviator else set())
        outcome.first_tensors = {fw: j.first_tensor(fw) or j.first_tensor(None) for fw in sorted(deviators)}
        outcome.seconds = time.perf_counter() - t0
        return outcome

    def _check_replicate(self, stage: Stage, knobs: dict[str, Knobs], outcome: StageOutcome) -> None:
        """Judge the stage again on independent batches, at the knobs attribution ended
        with. Agreement there means the residual was a round-off event, e.g. a ReLU input
        within round-off of zero whose gradient is 0 in one framework and not in another,
        which no setting explains and no other batch repeats."""
        if self.probe is None or self.probe.make_replicate is None:
            return
        if self._replicate is None:
            self._replicate = Triangulator(self.adapters, self.knobs, self.probe.make_replicate(), self.spec,
                                           self.reference, self.stages, models=self._models)
        if self._replicate.judge(stage, knobs).verdict == AGREE:
            j = outcome.after or outcome.judgement
            outcome.roundoff_event = {"verdict": j.verdict, "deviator": j.deviator, "first_tensor": j.first_tensor(j.deviator)}
            outcome.resolved = True

    def run(self, knobs: dict[str, Knobs] | None = None, stages: tuple[Stage, ...] | None = None) -> list[StageOutcome]:
        outcomes, known = [], []
        for stage in stages or self.stages:
            self.log(f"stage {stage.name}: {stage.title}")
            outcome = self.run_stage(stage, knobs, known)
            known += outcome.explained_by
            outcomes.append(outcome)
        return outcomes


def summarize(outcomes: list[StageOutcome]) -> list[dict]:
    """One finding per (framework, knob): the first stage where it shows, the first tensor."""
    findings: dict[tuple[str, str], dict] = {}
    for o in outcomes:
        for m in o.explained_by:
            key = (m.framework, m.knob)
            if key not in findings:
                findings[key] = {
                    "framework": m.framework,
                    "knob": m.knob,
                    "value": _plain(m.old),
                    "majority_value": _plain(m.new),
                    "first_stage": o.stage.name,
                    "first_tensor": m.first_tensor,
                    "stages": [o.stage.name],
                }
        for m in o.carried:
            if (m.framework, m.knob) in findings and o.stage.name not in findings[(m.framework, m.knob)]["stages"]:
                findings[(m.framework, m.knob)]["stages"].append(o.stage.name)
    unexplained = [
        {"stage": o.stage.name, "verdict": o.judgement.verdict, "deviator": o.judgement.deviator}
        for o in outcomes
        if o.judgement.verdict != AGREE and not o.resolved
    ]
    return list(findings.values()) + [{"unexplained": u} for u in unexplained]
