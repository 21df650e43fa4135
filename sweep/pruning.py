"""Stopping hopeless trials early: successive halving's rungs, for random and Bayesian search alike.

Keras Tuner prunes only inside Hyperband's brackets. Here every trial reports its validation score (the sweep's
objective) after each epoch to the oracle, which asks Optuna's ``SuccessiveHalvingPruner`` whether the trial
may go on; Optuna keeps each trial's per-epoch values and its rung records in a journal file beside Keras
Tuner's own oracle state, so ``--resume`` goes on with the same record, and with ``--workers`` the chief's
oracle judges every worker's trials.

Why successive halving and not median stopping: its rungs (epochs 1, 3 and 9 of 20 with the defaults) fix the
budget in advance (about a third of the trials pass epoch 1, a ninth epoch 3, a 27th epoch 9: under 3 epochs a
trial on average instead of 20), and it compares each trial with every trial that reached the same rung, pruned
ones included.
"The best third" is Optuna's rule once six trials have reached a rung; before that a trial passes only if it is
at least as good there as every trial before it (the best of fewer than six), so early in a sweep it is strict.
Optuna's ``MedianPruner`` compares with completed trials only, so it needs several full trials first (its
``n_startup_trials``), which on two CPU cores is most of an hour for the from-scratch families.
"""

from __future__ import annotations

from pathlib import Path

import optuna

# The first rung (epochs) and the reduction factor: a trial passes a rung if it is in the best third there. The
# first rung is one epoch, as Optuna's own default (``min_resource="auto"``) and ASHA's would put it for a
# 20-epoch trial; docs/pruning.md has the measurements behind it.
MIN_EPOCHS = 1
REDUCTION_FACTOR = 3
JOURNAL = "pruning.journal"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_direction(direction: str) -> str:
    """Optuna's name for a "min" or "max" objective."""
    return "minimize" if direction == "min" else "maximize"


class RungPruner:
    """The sweep's record of per-epoch scores, and the decision to stop a trial at a rung.

    Args:
        directory: the Keras Tuner project folder; the Optuna journal lives there.
        direction: "min" or "max", the sweep objective's.
        protected: the trial numbers (Keras Tuner's ids, from 0) that always run in full: trial 1, the study's
            model, which every sweep promises to run as the study did.
        first: the first rung (the family's ``first_rung``); the later ones follow by the reduction factor.
    """

    def __init__(self, directory: str | Path, direction: str, protected: set[int], first: int = MIN_EPOCHS) -> None:
        path = Path(directory) / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        self.study = optuna.create_study(
            study_name="sweep", storage=storage, load_if_exists=True,
            direction=study_direction(direction),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, first), reduction_factor=REDUCTION_FACTOR),
        )
        self.protected = set(protected)
        self._open: dict[str, optuna.Trial] = {}
        # A trial left running by a stopped process starts over when it runs again: its old record is closed.
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

    def report(self, trial_id: str, epoch: int, value: float) -> bool:
        """Record a trial's score after ``epoch``; True: the trial stops here (it missed a rung)."""
        trial = self._open.get(trial_id)
        if trial is None:
            trial = self._open[trial_id] = self.study.ask()
            trial.set_user_attr("trial_id", trial_id)
        trial.report(float(value), epoch)
        stop = trial.should_prune()  # asked for a protected trial too: it records the trial at its rungs
        return stop and int(trial_id) not in self.protected

    def restart(self, trial_id: str) -> None:
        """A trial that runs again from its first epoch: its open record is closed as failed."""
        trial = self._open.pop(trial_id, None)
        if trial is not None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def finish(self, trial_id: str, value: float | None, pruned: bool) -> None:
        """Close a trial's record: its final score, pruned, or failed (``value`` None)."""
        trial = self._open.pop(trial_id, None)
        if trial is None:
            return
        if pruned:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif value is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, float(value))



def rungs(epochs: int, first: int = MIN_EPOCHS) -> list[int]:
    """The epochs at which a trial of ``epochs`` epochs is judged (1, 3, 9 for 20; 3, 9 from a family whose
    ``first_rung`` is 3)."""
    found, rung = [], max(1, first)
    while rung < epochs:
        found.append(rung)
        rung *= REDUCTION_FACTOR
    return found
