"""Plain trial records: the best pick and the test accuracy's confidence interval."""

from __future__ import annotations

import pytest

from sweep.results import TrialRecord, accuracy_interval, best_record, interval_text


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


def test_best_record_takes_the_highest_validation_accuracy_and_the_earliest_on_a_tie():
    records = [TrialRecord("scratch", str(i), i + 1, {}, val_accuracy=v) for i, v in enumerate([0.6, 0.7, 0.7])]
    records.append(TrialRecord("scratch", "3", 4, {}))  # failed: NaN
    assert best_record(records).number == 2
    assert best_record([]) is None
