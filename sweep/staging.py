"""Staged search for a family with a costly optional stage (the transfer family's fine-tuning): the cheap trials
first, then a bounded number with the stage on.

A frozen-base trial takes 1-2 s and a fine-tuning one 7-45 s, so where the stage goes decides a sweep's time.
Three plans (``--fine-tune``):

* ``late`` (the default): the first half of the trials search with the stage off; each later one draws all
  its values afresh, with the stage on, and the oracle's stage gate (``SweepOracle._gate``) lets it take the
  stage only if its first stage (the head) is in the best third of the sweep's so far. The best fine-tuned
  models came from heads the frozen ranking does not favour (average pooling, whose frozen scores trail max
  pooling's), and each time from the best head so far, so the late trials draw their own heads rather than
  inherit the frozen leaders', and the gate spends the stage only on good ones (docs/fine-tuning.md).
* ``leaders``: the first half search with the stage off; every later trial takes one of the three best
  stage-off trials so far, in turn, with its seed, and draws only the stage's own settings: a controlled
  comparison of a model with and without the stage.
* ``any``: the stage is drawn with everything else in every trial (no plan).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import keras_tuner as kt

from search_spaces import registry
from sweep.results import param_text
from sweep.spec import SweepSpec

# How many of the best stage-off trials the later trials refine, in turn (``leaders``).
LEADERS = 3
# The share of a sweep's trials that take the stage, at its end (``late``).
LATE_SHARE = 0.5
# Redraws of a refinement that repeats an earlier trial's values before exploring instead.
MAX_REDRAWS = 20


@dataclass(frozen=True)
class LeaderStaging:
    """The plan: trials ``0 .. explore-1`` keep ``switch`` at ``off``; each later one turns the stage on,
    with values drawn afresh (``mode`` "late") or a leader's (``mode`` "leaders").

    ``switch`` is the hyperparameter that turns the stage on (``fine_tune_from``) and ``off`` its value that
    leaves it off; the stage's own settings are conditional on it.
    """

    switch: str
    off: Any
    explore: int
    seed: int = 0
    leaders: int = LEADERS
    mode: str = "leaders"

    @classmethod
    def for_sweep(cls, spec: SweepSpec) -> LeaderStaging | None:
        """The plan for a sweep (``--fine-tune late``, the default, or ``leaders``), or None where the search
        draws everything jointly: ``--fine-tune any``, a family without a staged hyperparameter, a sweep that
        fixes it (``--hp fine_tune_from=...``), Hyperband (its brackets decide which trials go on) and one
        trial."""
        switch = registry.family_class(spec.family).stage_switch
        if (spec.fine_tune == "any" or switch is None or spec.tuner == "hyperband"
                or switch[0] in dict(spec.fixed) or spec.trials < 2):
            return None
        if spec.fine_tune == "late":
            explore = spec.trials - max(1, round(spec.trials * LATE_SHARE))
        else:
            explore = max(1, spec.trials // 2)
        return cls(switch=switch[0], off=switch[1], explore=explore, seed=spec.seed, mode=spec.fine_tune)

    def propose(self, number: int, drawn: dict[str, Any], space: kt.HyperParameters,
                leaders: list[dict[str, Any]] | None, tried) -> dict[str, Any]:
        """The values for trial ``number`` (counting from 0).

        Args:
            drawn: what the oracle drew for it (used as it is, with the stage off, while exploring).
            space: the oracle's hyperparameters (its Fixed ones hold: a fixed stage setting stays fixed).
            leaders: the values of the finished stage-off trials, best first; None while a trial of the first
                phase still runs (with several workers): this trial then explores too, rather than refine a
                leader chosen from half the field (``leaders`` mode only).
            tried: a predicate, whether values repeat an earlier trial's.
        """
        rng = random.Random(f"{self.seed}-{number}")
        if number >= self.explore and self.mode == "late":
            values = dict(drawn)
            if values.get(self.switch, self.off) == self.off:
                values[self.switch] = self._stage_on(space, rng)
            for _ in range(MAX_REDRAWS):
                values = complete(space, values, rng)
                if not tried(values):
                    break
                values = {self.switch: self._stage_on(space, rng)}
            return values
        top = (leaders or [])[:self.leaders]
        if number >= self.explore and top:
            for attempt in range(MAX_REDRAWS):
                leader = top[(number - self.explore + attempt) % len(top)]
                values = complete(space, {**leader, self.switch: self._stage_on(space, rng)}, rng)
                if not tried(values):
                    return values
        values = complete(space, {**drawn, self.switch: self.off}, rng)
        for _ in range(MAX_REDRAWS):  # the draw with the stage forced off may repeat an earlier frozen trial
            if not tried(values):
                break
            values = complete(space, {self.switch: self.off}, rng)
        return values

    def _stage_on(self, space: kt.HyperParameters, rng: random.Random) -> Any:
        item = next(item for item in space.space if item.name == self.switch)
        return rng.choice([value for value in item.values if value != self.off])


def complete(space: kt.HyperParameters, values: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``values`` restricted to the hyperparameters active under them, in the space's order; an active one
    they lack is drawn (a Fixed one takes its value)."""
    hps = kt.HyperParameters()
    for item in space.space:
        hps.merge([item])
        if not hps.is_active(item):
            continue
        if isinstance(item, kt.engine.hyperparameters.Fixed):
            hps.values[item.name] = item.value
        elif item.name in values:
            hps.values[item.name] = values[item.name]
        else:
            hps.values[item.name] = item.random_sample(rng.randrange(2**31))
    return dict(hps.values)


def stage_names(space: kt.HyperParameters, switch: str) -> set[str]:
    """The switch and the hyperparameters conditional on it: the stage's settings, not the first stage's."""
    return {switch} | {item.name for item in space.space if any(c.name == switch for c in item.conditions)}


def leader_of(runs: list, values: dict[str, Any], space: kt.HyperParameters, switch: tuple[str, Any],
              objective: str = "val_loss", direction: str = "min") -> int | None:
    """The trial number of the finished stage-off trial among ``runs`` (a sweep's MLflow trial runs) whose
    first stage a trial with ``values`` refines: same values but the stage's (the best by ``objective`` if
    several match, as the oracle ranked them; the earlier on a tie); None if there is none.

    The refining trial takes that trial's seed, so its first stage reproduces the leader's model exactly and
    the costly stage starts from the very model that earned the lead.
    """
    name, off = switch
    if values.get(name, off) == off:
        return None
    stage = stage_names(space, name)
    head = {k: param_text(v) for k, v in values.items() if k not in stage}
    matches = [run for run in runs
               if run.info.status == "FINISHED" and run.data.params.get(name) == str(off)
               and "trial_number" in run.data.tags and objective in run.data.metrics
               and all(run.data.params.get(k) == v for k, v in head.items())]
    if not matches:
        return None
    sign = 1 if direction == "min" else -1
    best = min(matches, key=lambda r: (sign * r.data.metrics[objective], int(r.data.tags["trial_number"])))
    return int(best.data.tags["trial_number"])
