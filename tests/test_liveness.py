"""Worker liveness at the oracle, on a controlled clock: a heartbeat per epoch keeps a trial alive however long
it runs, silence past the timeout fails it, and a result that comes after that is not counted twice.

These drive the oracle as the chief's gRPC servicer does (one call at a time); no server, no training.
"""

from __future__ import annotations

from types import SimpleNamespace

import keras_tuner as kt
import pytest
from keras_tuner.engine.trial import Trial

from search_spaces import make_hypermodel
from sweep import oracles
from sweep.spec import SweepSpec
from sweep.tuning import ConsecutiveFailures, Heartbeat, build_oracle

TIMEOUT = 60.0


class Clock:
    """The clock (``time.monotonic`` and ``time.time``) as ``sweep.oracles`` sees it, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(oracles, "time", SimpleNamespace(monotonic=clock, time=clock))
    return clock


@pytest.fixture(params=["random", "bayesian", "hyperband"])
def oracle(request, tmp_path, clock):
    """The sweep's oracle (each tuner's), with the scratch family's search space declared."""
    oracle = build_oracle(SweepSpec(family="scratch", tuner=request.param, trials=5, epochs=4))
    oracle._set_project_dir(str(tmp_path), "x")
    hp = kt.HyperParameters()
    make_hypermodel("scratch").declare(hp)
    oracle.update_space(hp)
    return oracle


def expired(oracle) -> list[tuple[str, str]]:
    """(tuner id, trial id) of each trial the oracle fails now for silence."""
    return [(tuner_id, trial_id) for tuner_id, trial_id, _ in oracle.expire_silent_trials(TIMEOUT)]


def as_sent(trial: Trial) -> Trial:
    """The worker's own copy of a trial, as gRPC carries it (a change to it is not the oracle's)."""
    return Trial.from_proto(trial.to_proto())


def test_a_silent_workers_trial_is_failed_once_the_timeout_passes(oracle, clock):
    silent = oracle.create_trial("worker0")
    alive = oracle.create_trial("worker1")
    assert (silent.status, alive.status) == ("RUNNING", "RUNNING")
    assert oracle.activity() == (2, 2)

    clock.advance(TIMEOUT - 1)
    oracle.update_trial(alive.trial_id, {}, step=1)  # worker1's epoch 1; worker0 says nothing
    assert expired(oracle) == []  # not yet: silent for 59 s
    assert oracle.trials[silent.trial_id].status == "RUNNING"

    clock.advance(2)  # worker0 silent for 61 s, worker1 for 2 s
    assert expired(oracle) == [("worker0", silent.trial_id)]
    failed = oracle.trials[silent.trial_id]
    assert failed.status == "FAILED"
    assert failed.message == "worker worker0 sent no heartbeat for 60s"
    assert oracle.end_order == [silent.trial_id]
    assert oracle.ongoing_trials == {"worker1": alive}
    assert oracle.activity() == (1, 2)  # worker0 stays registered: it may come back
    assert expired(oracle) == []  # failed once, not again

    # Its worker learns it at its next heartbeat, and the trial loop stops the trial.
    assert oracle.update_trial(silent.trial_id, {}, step=1).status == "FAILED"
    with pytest.raises(kt.errors.FailedTrialError, match="no heartbeat within --trial-timeout"):
        Heartbeat(oracle, silent.trial_id).on_epoch_end(1)


def test_a_slow_worker_that_reports_is_not_failed_and_its_result_is_scored(oracle, clock):
    trial = oracle.create_trial("worker0")
    sent = as_sent(trial)
    heartbeat = Heartbeat(oracle, trial.trial_id)
    started = clock.now
    for epoch in range(20):  # 50 s an epoch: 1000 s in all, far beyond the 60 s timeout
        clock.advance(50)
        heartbeat.on_epoch_end(epoch)
        assert expired(oracle) == [], f"failed after epoch {epoch + 1}"
    assert clock.now - started == 1000
    assert oracle.trials[trial.trial_id].status == "RUNNING"
    assert not oracle.trials[trial.trial_id].metrics.exists("val_loss")  # a heartbeat carries no score

    clock.advance(50)
    answer = oracle.update_trial(trial.trial_id, {"val_loss": 0.25, "val_accuracy": 0.875}, step=20)
    assert answer.status == "RUNNING"
    sent.status = "COMPLETED"
    oracle.end_trial(sent)
    ended = oracle.trials[trial.trial_id]
    assert (ended.status, ended.score) == ("COMPLETED", 0.25)
    assert oracle.end_order == [trial.trial_id]
    assert [t.trial_id for t in oracle.get_best_trials(1)] == [trial.trial_id]
    assert oracle.activity() == (0, 1)
    assert trial.trial_id not in oracle.last_heard


def test_a_result_after_expiry_is_not_counted_twice(oracle, clock):
    trial = oracle.create_trial("worker0")
    sent = as_sent(trial)
    clock.advance(TIMEOUT + 1)
    assert expired(oracle) == [("worker0", trial.trial_id)]

    # The worker was slow, not gone: its last epoch's heartbeat, its result and its end arrive late.
    assert oracle.update_trial(trial.trial_id, {}, step=4).status == "FAILED"
    answer = oracle.update_trial(trial.trial_id, {"val_loss": 0.1, "val_accuracy": 1.0}, step=4)
    assert answer.status == "FAILED"
    sent.status = "COMPLETED"
    oracle.end_trial(sent)

    ended = oracle.trials[trial.trial_id]
    assert ended.status == "FAILED" and ended.score is None
    assert not ended.metrics.exists("val_loss")
    assert oracle.end_order == [trial.trial_id]  # ended once, by the expiry
    assert [t.status for t in oracle.get_best_trials(1)] == ["FAILED"]  # no completed trial to rank
    assert oracle.activity() == (0, 1)

    # The worker's next trial is a new one, and its clock starts afresh.
    following = oracle.create_trial("worker0")
    assert following.status == "RUNNING" and following.trial_id != trial.trial_id
    assert expired(oracle) == []


def test_a_worker_that_takes_its_trial_back_restarts_its_clock(oracle, clock):
    """A restarted worker (same tuner id) is handed its trial again; that counts as hearing from it."""
    trial = oracle.create_trial("worker0")
    clock.advance(TIMEOUT - 10)
    again = oracle.create_trial("worker0")
    assert again.trial_id == trial.trial_id
    clock.advance(20)  # 70 s since the trial began, 20 s since the worker came back
    assert expired(oracle) == []
    clock.advance(TIMEOUT)
    assert expired(oracle) == [("worker0", trial.trial_id)]


def test_silent_trials_failing_in_a_row_stop_the_sweep(oracle, clock):
    trials = [oracle.create_trial(f"worker{i}") for i in range(3)]
    clock.advance(TIMEOUT + 1)
    assert len(oracle.expire_silent_trials(TIMEOUT)) == 3
    # kept for the caller to raise outside the oracle's lock, which stays free for the workers' calls
    assert isinstance(oracle.failure, ConsecutiveFailures)
    assert str(oracle.failure) == "worker worker2 sent no heartbeat for 60s"
    assert oracle.activity() == (0, 3)  # would block for ever had the lock been left held
    assert [oracle.trials[t.trial_id].status for t in trials] == ["FAILED"] * 3
    # the trial whose expiry stopped the sweep is expired like the others: a late result from it is not counted
    last = trials[2]
    assert oracle.update_trial(last.trial_id, {"val_loss": 0.1, "val_accuracy": 1.0}, step=4).status == "FAILED"
    late = as_sent(last)
    late.status = "COMPLETED"
    oracle.end_trial(late)
    assert oracle.trials[last.trial_id].status == "FAILED"
    assert not oracle.trials[last.trial_id].metrics.exists("val_loss")
    assert oracle.end_order == [t.trial_id for t in trials]


@pytest.mark.parametrize("tuner", ["random", "bayesian"])
def test_a_lost_trials_values_run_again_as_a_new_trial_while_its_retries_last(tmp_path, clock, tuner):
    """Trial 1 (the study's model) lost with its machine: its values are the next trial handed out, the sweep
    still runs its five, and a second loss of the same values (retries: 1) is final; a resumed oracle keeps
    the count."""
    oracle = build_oracle(SweepSpec(family="scratch", tuner=tuner, trials=5, epochs=4))
    oracle._set_project_dir(str(tmp_path), "x")
    hp = kt.HyperParameters()
    make_hypermodel("scratch").declare(hp)
    oracle.update_space(hp)
    first = oracle.create_trial("worker0")
    clock.advance(TIMEOUT + 1)
    assert oracle.expire_silent_trials(TIMEOUT) == [("worker0", first.trial_id, True)]
    assert oracle.max_trials == 6
    again = oracle.create_trial("worker1")
    assert again.trial_id != first.trial_id and again.hyperparameters.values == first.hyperparameters.values
    clock.advance(TIMEOUT + 1)
    assert oracle.expire_silent_trials(TIMEOUT) == [("worker1", again.trial_id, False)]  # retries used up
    assert oracle.max_trials == 6
    following = oracle.create_trial("worker1")
    assert following.hyperparameters.values != first.hyperparameters.values  # a new draw

    oracle.save()
    resumed = build_oracle(SweepSpec(family="scratch", tuner=tuner, trials=5, epochs=4))
    resumed._set_project_dir(str(tmp_path), "x")
    resumed.reload()  # what --resume does
    assert resumed.max_trials == 6 and resumed.retry_values == [] and len(resumed.retry_counts) == 1


def test_hyperband_does_not_rerun_a_lost_trial(oracle, clock):
    oracle.create_trial("worker0")
    clock.advance(TIMEOUT + 1)
    again = oracle.expire_silent_trials(TIMEOUT)[0][2]
    assert again is (not isinstance(oracle, kt.oracles.HyperbandOracle))


def test_a_waiting_chief_says_what_it_waits_for(tmp_path, clock):
    from sweep.distributed import Chief

    oracle = build_oracle(SweepSpec(family="scratch", trials=5, epochs=4))
    oracle._set_project_dir(str(tmp_path), "x")
    hp = kt.HyperParameters()
    make_hypermodel("scratch").declare(hp)
    oracle.update_space(hp)
    chief = Chief("127.0.0.1", 8000)
    assert chief.waiting_line(oracle, "127.0.0.1:8000", "s1", 31) == (
        "Chief waiting: no worker has joined in 31s; start one with `sweep worker --chief 127.0.0.1:8000 --sweep s1`.")
    trial = oracle.create_trial("w0")
    oracle.create_trial("w1")
    clock.advance(20)
    oracle.update_trial(trial.trial_id, {}, step=1)
    assert chief.waiting_line(oracle, "a", "s1", 50) is None  # both heard from within 30 s
    clock.advance(25)
    assert chief.waiting_line(oracle, "a", "s1", 75) == (
        "Chief waiting: worker w1 sent no heartbeat for 45s (trial 2); without --trial-timeout the chief waits for "
        "it; restart a dead worker with the same --tuner-id.")
    clock.advance(10)
    timed = Chief("127.0.0.1", 8000, trial_timeout=600)
    assert timed.waiting_line(oracle, "a", "s1", 85) == (
        "Chief waiting: worker w1 sent no heartbeat for 55s (trial 2) (and 1 more); --trial-timeout fails it after "
        "600s.")
