"""Plain trial records: the best pick and the test accuracy's confidence interval."""

from __future__ import annotations

import pytest

from sweep.results import TrialRecord, accuracy_interval, best_record, best_run, interval_text


def test_accuracy_interval_is_the_wilson_score_interval():
    # textbook values: 50 of 100 -> (0.4038, 0.5962)
    assert accuracy_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    # 186 of 192 test images (96.9 %): 97.5 % and the study's 97.9 % both lie inside
    low, high = accuracy_interval(186 / 192, 192)
    assert (round(low, 4), round(high, 4)) == (0.9335, 0.9856)
    # a perfect score still has a lower bound below 1; bounds stay within [0, 1]
    assert accuracy_interval(1.0, 192) == pytest.approx((0.98038, 1.0), abs=1e-5)
    assert accuracy_interval(0.0, 10)[0] == 0.0
    # more images, narrower interval
    assert accuracy_interval(0.9, 1000)[1] - accuracy_interval(0.9, 1000)[0] < accuracy_interval(0.9, 100)[1] - \
        accuracy_interval(0.9, 100)[0]
    nan_low, nan_high = accuracy_interval(0.9, 0)
    assert nan_low != nan_low and nan_high != nan_high


def test_interval_text_names_the_interval_and_the_image_count():
    record = TrialRecord("transfer", "0", 1, {}, test_accuracy=186 / 192, test_images=192)
    assert interval_text(record) == " (95% CI 93.4%-98.6%, 192 images)"
    assert interval_text(TrialRecord("transfer", "0", 1, {}, test_accuracy=0.5)) == ""  # no image count logged


def test_best_record_takes_the_lowest_validation_loss_by_default_and_the_earliest_on_a_tie():
    # trial 2 is the lucky, overconfident one: the most accurate on validation, with the worst loss
    losses, accuracies = [0.09, 0.30, 0.07, 0.07], [0.970, 0.975, 0.972, 0.972]
    records = [TrialRecord("transfer", str(i), i + 1, {}, val_loss=loss, val_accuracy=acc)
               for i, (loss, acc) in enumerate(zip(losses, accuracies))]
    records.append(TrialRecord("transfer", "4", 5, {}))  # failed: NaN
    assert best_record(records).number == 3
    assert best_record(records, "val_loss").number == 3
    assert best_record(records, "val_accuracy").number == 2
    assert best_record([]) is None
    assert best_record(records[-1:]) is None  # only a failed trial
    pruned = TrialRecord("scratch", "5", 6, {}, val_loss=0.01, val_accuracy=0.99, pruned_at=2)
    assert best_record([*records, pruned]).number == 3  # scored at 2 epochs: never the best of full trials


def test_best_record_by_validation_accuracy_takes_the_earliest_on_a_tie():
    records = [TrialRecord("scratch", str(i), i + 1, {}, val_accuracy=v) for i, v in enumerate([0.6, 0.7, 0.7])]
    assert best_record(records, "val_accuracy").number == 2
    with pytest.raises(ValueError, match="unknown objective 'accuracy'"):
        best_record(records, "accuracy")


def test_best_run_ranks_logged_runs_by_the_metric_and_puts_runs_without_it_last():
    from types import SimpleNamespace

    def run(start, tags=None, **metrics):
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags=tags or {}),
                               info=SimpleNamespace(start_time=start))

    runs = [run(1, val_loss=0.2, val_accuracy=0.9, test_accuracy=0.95), run(2, val_loss=0.1, val_accuracy=0.8),
            run(3), run(4, val_loss=0.1, val_accuracy=0.9, test_accuracy=0.96),
            run(5, {"pruned_at_epoch": "2"}, val_loss=0.05, val_accuracy=0.99, test_accuracy=0.99)]
    assert best_run(runs).info.start_time == 2  # lowest loss; the earlier of the tie; never a pruned trial
    assert best_run(runs, "val_accuracy").info.start_time == 1
    assert best_run(runs, "test_accuracy").info.start_time == 4
    assert best_run([run(1), run(2)], "val_loss").info.start_time == 1
    nan = float("nan")
    assert best_run([run(1, val_loss=nan, val_accuracy=nan), run(2, val_loss=0.3, val_accuracy=0.5)]).info.start_time == 2
    assert best_run([run(1, val_accuracy=nan), run(2, val_accuracy=0.5)], "val_accuracy").info.start_time == 2


def test_objective_of_is_the_sweeps_own_when_they_agree():
    from types import SimpleNamespace

    from sweep.results import objective_of

    def run(**params):
        return SimpleNamespace(data=SimpleNamespace(params=params))

    assert objective_of([run(objective="val_accuracy"), run(objective="val_accuracy")]) == "val_accuracy"
    assert objective_of([run(objective="val_loss")]) == "val_loss"
    assert objective_of([run(objective="val_accuracy"), run(objective="val_loss")]) == "val_loss"  # mixed: default
