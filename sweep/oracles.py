"""Keras Tuner oracles for a sweep: trial 1 is the study's model, a worker's liveness is its heartbeat, a family
with a costly stage is searched in two phases (``sweep.staging``), and hopeless trials stop at successive
halving's rungs (``sweep.pruning``)."""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from typing import Any, Callable

import keras_tuner as kt
from keras_tuner.engine.trial import TrialStatus

from search_spaces import registry
from search_spaces.base import HyperFamily
from search_spaces.space import default_values, fixed_space, hyperparameters
from sweep import compat
from sweep.pruning import REDUCTION_FACTOR, RungPruner, rungs
from sweep.spec import OBJECTIVES, SweepSpec
from sweep.staging import LeaderStaging


# Heads a sweep must have seen before the stage gate judges one (``SweepOracle._gate``).
GATE_MIN_HEADS = 3


class ConsecutiveFailures(RuntimeError):
    """Keras Tuner's oracle stopped the search: too many trials failed in a row."""


class SweepOracle:
    """Oracle mixin: trial 1 is the study's model, and a worker's liveness is its heartbeat.

    * The first values any oracle draws are the search space's defaults (the study's model), through the
      public ``populate_space`` hook; Hyperband's own ``tuner/*`` bookkeeping is kept.
    * Every ``update_trial`` from a worker is a heartbeat (the trial loop sends one per epoch). With a
      trial timeout, ``expire_silent_trials`` fails a trial whose worker went silent for that long; a result
      that arrives after that is not counted a second time. Its hyperparameters run again as a new trial (the
      sweep's trial count grows by one, so it still runs as many), up to ``trial_retries`` times per set of
      values, as Keras Tuner's ``max_retries_per_trial`` does for a trial that crashed: a lost machine costs
      time, not a trial (not for Hyperband, whose brackets own their trials' values).
    * With ``pruning`` on, the per-epoch report carries the trial's score (``epoch_<objective>``): a trial
      that misses a rung of successive halving (``sweep.pruning``) gets back the status Keras Tuner reserves
      for signalling early stopping (STOPPED; its ``Oracle.update_trial`` notes it as the way to stop a trial
      early) and ends after that epoch; the last epoch is never judged (the trial ran in full). A pruned trial is finished,
      its score is the one at that epoch, and it never counts as the best (``get_best_trials``): only trials
      that ran every epoch are ranked, so one stopped before it could overfit is not preferred to one that
      ran on.
    * Keras Tuner raises a bare RuntimeError when too many trials failed in a row. Raised inside a
      ``@synchronized`` method it would leave the oracle's lock held (the decorator releases it only on a normal
      return), so it is kept as ``failure`` (a ``ConsecutiveFailures``) for the caller to raise outside.
    """

    def __init__(self, *args: Any, staging: LeaderStaging | None = None, pruning: bool = False, epochs: int = 1,
                 stage_epochs: Callable[[dict[str, Any]], int] = HyperFamily.stage_epochs,
                 planned_trials: int | None = None, deadline: float | None = None, trial_retries: int = 1,
                 first_rung: int = 1, stage_gate: bool = False, **kwargs: Any) -> None:
        """The sweep's concerns, each given here (``build_oracle`` reads them from the spec and the family):

        Args:
            staging: the two-phase plan of a family with a costly stage (``sweep.staging``), or None.
            pruning: stop trials that miss a rung of successive halving; ``first_rung``: the epoch of its first.
            epochs: a trial's epochs; ``stage_epochs(values)``: the later stage's after them.
            planned_trials: the spec's trial count (re-runs of expired trials come on top of it).
            deadline: the wall-clock time (``time.time()``) by which the sweep ends (``--time-budget``), or None.
            trial_retries: re-runs of an expired trial's values (``--trial-retries``).
            stage_gate: stop a trial before its costly later stage unless its first stage is in the best
                third so far (``_gate``).
        Other arguments go to Keras Tuner's oracle.
        """
        super().__init__(*args, **kwargs)
        self.last_heard: dict[str, float] = {}
        self.expired: set[str] = set()
        self.failure: ConsecutiveFailures | None = None
        self.verbose = 0  # our one line per trial replaces Keras Tuner's tables, in workers too
        self.staging = staging
        self.pruning = pruning
        self.first_rung = first_rung
        self.pruned: dict[str, int] = {}  # trial id -> the epoch it stopped at (saved with the oracle's state)
        self._pruner: RungPruner | None = None
        # The time budget: the seconds of each epoch seen so far say whether another trial still fits.
        self.deadline = deadline
        self.epochs = epochs
        self.stage_epochs = stage_epochs
        self.epoch_seconds: list[float] = []
        self.out_of_time = False
        self._last_epoch: dict[str, tuple[int, float]] = {}
        self.trial_retries = trial_retries
        self.retry_values: list[dict[str, Any]] = []  # values of expired trials, handed out before new draws
        self.retry_counts: dict[str, int] = {}  # values (as JSON) -> times they were queued again
        self.planned_trials = planned_trials
        self.stage_gate = stage_gate
        self.head_scores: dict[str, float] = {}  # trial id -> its score at the last head epoch (saved)

    # Hyperband's first draw opens a bracket: its tuner/* values must come from Hyperband itself.
    defaults_inside_draw = False

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        if self.deadline is not None and not self._time_for_a_trial():
            self.out_of_time = True
            return {"status": TrialStatus.STOPPED, "values": None}
        if self.retry_values:  # a trial whose worker went silent: its values again, under a new trial id
            return {"status": TrialStatus.RUNNING, "values": self.retry_values.pop(0)}
        defaults = default_values(self.hyperparameters)
        pending = bool(defaults) and not self._tried(defaults)
        if pending and not self.defaults_inside_draw:
            # Returned without a draw: the oracle's random stream starts at trial 2.
            return {"status": TrialStatus.RUNNING, "values": defaults}
        response = super().populate_space(trial_id)
        values = response.get("values")
        if pending and response["status"] == TrialStatus.RUNNING and values and "tuner/trial_id" not in values:
            values.update(defaults)
        elif self.staging is not None and response["status"] == TrialStatus.RUNNING and values:
            response["values"] = self.staging.propose(int(trial_id), values, self.hyperparameters, self._leaders(),
                                                      self._tried)
        return response

    def _leaders(self) -> list[dict[str, Any]] | None:
        """The values of the finished trials with the staged part off, best first (for ``staging``); None
        while a trial of the first phase is still running (on another worker)."""
        switch, off = self.staging.switch, self.staging.off
        if any(t.status == TrialStatus.RUNNING and int(t.trial_id) < self.staging.explore
               for t in self.trials.values()):
            return None
        done = [t for t in self.trials.values() if t.status == TrialStatus.COMPLETED and t.score is not None
                and t.hyperparameters.values.get(switch) == off]
        done.sort(key=lambda t: t.score, reverse=self.objective.direction == "max")
        return [hyperparameters(t.hyperparameters.values) for t in done]

    def _time_for_a_trial(self) -> bool:
        """Whether a whole trial (every epoch, at the median epoch time so far) ends before the deadline."""
        left = self.deadline - time.time()
        if not self.epoch_seconds:
            return left > 0
        return left >= statistics.median(self.epoch_seconds) * self.epochs

    def seconds_left(self) -> float | None:
        """The time budget left, in seconds (None without one)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def _tried(self, values: dict[str, Any]) -> bool:
        return any(all(trial.hyperparameters.values.get(name) == value for name, value in values.items())
                   for trial in self.trials.values())

    @kt.synchronized
    def create_trial(self, tuner_id: str):
        trial = super().create_trial(tuner_id)
        if trial.status == TrialStatus.RUNNING:
            self.last_heard[trial.trial_id] = time.monotonic()  # again when a restarted worker takes it back
            # a trial handed out again (a restarted worker, a resumed sweep) starts over: so does its record
            self.pruned.pop(trial.trial_id, None)
            self.head_scores.pop(trial.trial_id, None)
            self._last_epoch.pop(trial.trial_id, None)
            if self._pruner is not None:
                self._pruner.restart(trial.trial_id)
        return trial

    @kt.synchronized
    def update_trial(self, trial_id: str, metrics: dict, step: int = 0):
        if trial_id in self.expired:
            return self.trials[trial_id]  # FAILED: the worker stops the trial
        self.last_heard[trial_id] = time.monotonic()
        epoch_score = metrics.get(epoch_metric(self.objective.name))
        if epoch_score is not None:
            values = self.trials[trial_id].hyperparameters.values
            head = int(values.get("tuner/epochs", self.epochs))
            if step <= head:  # the budget estimates a trial per head epoch (a later stage costs more)
                self._time_epoch(trial_id, step)
            last = step >= head + self.stage_epochs(values)  # a later stage is stopped at the deadline too
            out_of_time = self.deadline is not None and time.time() >= self.deadline
            gated = step == head and self._gate(trial_id, epoch_score, staged=not last)
            if trial_id not in self.pruned and not last and (gated or self._prune(trial_id, step, epoch_score)
                                                             or out_of_time):
                self.pruned[trial_id] = step  # stopped at a rung, or at the time budget
                self.save()
        if self.objective.name not in metrics:  # a heartbeat (and the epoch's score), not a result
            if trial_id in self.pruned:
                stopped = copy.copy(self.trials[trial_id])
                stopped.status = TrialStatus.STOPPED
                return stopped
            return self.trials[trial_id]
        return super().update_trial(trial_id, metrics, step)

    def _gate(self, trial_id: str, score: float, staged: bool) -> bool:
        """Record a trial's first-stage score (its head's, at the last head epoch), and say whether a trial
        with a costly later stage (``staged``) stops before it: its head must be in the best third of every
        trial's head so far, stage-off trials included (successive halving's rule, ``sweep.pruning``; the
        first ``GATE_MIN_HEADS`` heads always pass). In the measured sweeps the fine-tuned pick's head was
        the best head so far every time, and a head outside the best third never ended best after fine-tuning
        (docs/fine-tuning.md); the stage costs as much as ten frozen trials."""
        if trial_id in self.head_scores:  # reported twice (a repeated heartbeat): judged once
            return False
        earlier = list(self.head_scores.values())
        self.head_scores[trial_id] = float(score)
        if not (self.stage_gate and staged) or len(earlier) < GATE_MIN_HEADS:
            return False
        sign = 1.0 if self.objective.direction == "min" else -1.0
        better = sum(sign * other < sign * score for other in earlier)
        return better * REDUCTION_FACTOR >= len(earlier)  # more than a third of them beat it

    def _prune(self, trial_id: str, step: int, score: float) -> bool:
        """Whether the trial misses a rung here. An error of the pruning record (its journal file) turns
        pruning off for the rest of the sweep instead of failing the search: this runs under the oracle's lock,
        which Keras Tuner releases only on a normal return."""
        if not self.pruning:
            return False
        try:
            return self.pruner().report(trial_id, step, score)
        except Exception as exc:  # noqa: BLE001 (any failure of the record: the search goes on unpruned)
            self._stop_pruning(exc)
            return False

    def _stop_pruning(self, exc: Exception) -> None:
        self.pruning = False
        warnings.warn(f"pruning turned off for the rest of the sweep: {type(exc).__name__}: {exc}")

    def _time_epoch(self, trial_id: str, step: int) -> None:
        """Keep the time between two epoch reports of a trial (the first epoch also builds the model: not kept)."""
        now = time.time()
        last = self._last_epoch.get(trial_id)
        if last is not None and step == last[0] + 1:
            self.epoch_seconds.append(now - last[1])
        self._last_epoch[trial_id] = (step, now)

    def pruner(self) -> RungPruner:
        """Successive halving's record, beside the oracle's own state (made on first use: the tuner sets the
        project folder after building the oracle)."""
        if self._pruner is None:
            self._pruner = RungPruner(compat.oracle_folder(self), self.objective.direction, protected={0},
                                      first=self.first_rung)
        return self._pruner

    @kt.synchronized  # workers ask for it through the chief while it expires trials
    def get_best_trials(self, num_trials: int = 1):
        ranked = super().get_best_trials(len(self.trials))
        return [t for t in ranked if t.trial_id not in self.pruned][:num_trials]

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["pruned"] = dict(self.pruned)
        state["retry_values"] = list(self.retry_values)
        state["retry_counts"] = dict(self.retry_counts)
        state["head_scores"] = dict(self.head_scores)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.pruned = {k: int(v) for k, v in state.get("pruned", {}).items()}
        self.retry_values = list(state.get("retry_values", []))
        self.retry_counts = {k: int(v) for k, v in state.get("retry_counts", {}).items()}
        self.head_scores = {k: float(v) for k, v in state.get("head_scores", {}).items()}
        if self.planned_trials is not None:  # the re-runs come on top of the spec's count
            self.max_trials = self.planned_trials + sum(self.retry_counts.values())

    @kt.synchronized
    def end_trial(self, trial) -> None:
        if trial.trial_id in self.expired:
            return  # ended already, by expire_silent_trials
        self._end(trial)

    def _end(self, trial) -> None:
        self.last_heard.pop(trial.trial_id, None)
        try:
            super().end_trial(trial)
        except RuntimeError as exc:  # raised only by the consecutive-failures check, before its last steps
            self.failure = ConsecutiveFailures(str(exc).strip().splitlines()[-1])
            for tuner_id, ongoing in list(self.ongoing_trials.items()):
                if ongoing.trial_id == trial.trial_id:
                    self.ongoing_trials.pop(tuner_id)
            self.save()
        if self.pruning:
            done = self.trials.get(trial.trial_id, trial)
            score = done.score if done.status == TrialStatus.COMPLETED else None
            try:
                self.pruner().finish(trial.trial_id, score, pruned=trial.trial_id in self.pruned)
            except Exception as exc:  # noqa: BLE001 (see _prune)
                self._stop_pruning(exc)

    @kt.synchronized
    def expire_silent_trials(self, timeout: float) -> list[tuple[str, str, bool]]:
        """Fail every ongoing trial whose worker sent nothing for ``timeout`` seconds, and queue its values to
        run again as a new trial while its retries last.

        Returns:
            (tuner id, trial id, whether its values run again) of each trial failed now.
        """
        now, failed = time.monotonic(), []
        for tuner_id, trial in list(self.ongoing_trials.items()):
            if now - self.last_heard.get(trial.trial_id, now) > timeout:
                trial.status = TrialStatus.FAILED
                trial.message = f"worker {tuner_id} sent no heartbeat for {timeout:.0f}s"
                self.expired.add(trial.trial_id)
                again = self._queue_again(trial.hyperparameters.values)
                self._end(trial)
                failed.append((tuner_id, trial.trial_id, again))
        return failed

    def _queue_again(self, values: dict[str, Any]) -> bool:
        if isinstance(self, kt.oracles.HyperbandOracle) or self.max_trials is None:
            return False
        key = json.dumps(values, sort_keys=True, default=str)
        if self.retry_counts.get(key, 0) >= self.trial_retries:
            return False
        self.retry_counts[key] = self.retry_counts.get(key, 0) + 1
        self.retry_values.append(dict(values))
        self.max_trials += 1  # the re-run takes the lost trial's place in the count
        return True

    @kt.synchronized
    def silences(self) -> list[tuple[str, str, float]]:
        """(tuner id, trial id, seconds since its last heartbeat) of each ongoing trial, longest first."""
        now = time.monotonic()
        found = [(tuner_id, trial.trial_id, now - self.last_heard.get(trial.trial_id, now))
                 for tuner_id, trial in self.ongoing_trials.items()]
        return sorted(found, key=lambda item: -item[2])

    @kt.synchronized
    def activity(self) -> tuple[int, int]:
        """(ongoing trials, registered workers), read under the oracle's lock."""
        return len(self.ongoing_trials), len(self.tuner_ids)


class SweepRandomSearch(SweepOracle, kt.oracles.RandomSearchOracle):
    pass


class SweepBayesian(SweepOracle, kt.oracles.BayesianOptimizationOracle):
    pass


class SweepHyperband(SweepOracle, kt.oracles.HyperbandOracle):
    defaults_inside_draw = True


def build_oracle(spec: SweepSpec, deadline: float | None = None, trial_retries: int = 1) -> kt.Oracle:
    """The oracle for the spec's tuner, scoring trials by its objective; Hyperband's trial count is capped at
    ``trials`` as well, and ``epochs`` is its maximum. The spec's fixed hyperparameters are held at their
    values (Keras Tuner's ``hyperparameters`` with ``tune_new_entries``). A family with a costly stage (its
    ``stage_switch``) is searched in two phases (``sweep.staging``), except by Hyperband; a ``prunable`` one's
    hopeless trials stop at successive halving's rungs, except under Hyperband (its brackets prune)."""
    score = kt.Objective(spec.objective, direction=OBJECTIVES[spec.objective])
    family = registry.family_class(spec.family)
    space = {}
    if spec.fixed:
        space = {"hyperparameters": fixed_space(spec.family, dict(spec.fixed)), "tune_new_entries": True}
    concerns = dict(epochs=spec.epochs, stage_epochs=family.stage_epochs, deadline=deadline,
                    trial_retries=trial_retries)
    if spec.tuner == "hyperband":
        oracle = SweepHyperband(objective=score, max_epochs=spec.epochs, seed=spec.seed, **concerns, **space)
        oracle.max_trials = spec.trials  # Keras Tuner's Hyperband takes no trial count of its own
        return oracle
    cls = {"random": SweepRandomSearch, "bayesian": SweepBayesian}[spec.tuner]
    staging = LeaderStaging.for_sweep(spec)
    return cls(objective=score, max_trials=spec.trials, seed=spec.seed, staging=staging,
               stage_gate=staging is not None and staging.mode == "late",
               pruning=spec.prune and family.prunable and bool(rungs(spec.epochs, family.first_rung)),  # a rung to judge at
               first_rung=family.first_rung, planned_trials=spec.trials, **concerns, **space)


def epoch_metric(objective: str) -> str:
    """The name under which a trial reports its objective after each epoch (not its result: the oracle keeps
    it for pruning only)."""
    return f"epoch_{objective}"
