"""fusion.finetune's classification metrics: hand-computed values, parity with scikit-learn, the
empty case."""

from __future__ import annotations

import random

import pytest

from fusion.finetune.tasks import classification_metrics


def test_metrics_equal_hand_computed_values():
    gold = ["a", "a", "a", "b", "b", "c", "c"]
    pred = ["a", "a", "b", "b", "a", "a", "d"]   # c is never predicted, d is never gold
    m = classification_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(3 / 7)
    assert m["micro_f1"] == pytest.approx(3 / 7)     # one gold, one prediction each: = accuracy
    # per label F1: a: P 2/4, R 2/3 -> 4/7; b: P 1/2, R 1/2 -> 1/2; c: 0 (never predicted); d: 0
    assert m["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0 + 0) / 4)
    assert m["macro_labels"] == 4
    assert m["per_label"]["a"] == pytest.approx({"support": 3, "predicted": 4, "correct": 2,
                                                 "precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert m["per_label"]["c"] == {"support": 2, "predicted": 0, "correct": 0, "precision": 0.0,
                                   "recall": 0.0, "f1": 0.0}
    assert m["per_label"]["d"]["predicted"] == 1 and m["per_label"]["d"]["f1"] == 0.0


def test_metrics_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    gold = [rng.choice("abcde") for _ in range(200)]
    pred = [g if rng.random() < 0.6 else rng.choice("abcdef") for g in gold]
    m = classification_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred), abs=1e-12)
    assert m["micro_f1"] == pytest.approx(metrics.f1_score(gold, pred, average="micro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(
        metrics.f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)


def test_metrics_of_nothing_are_zero_not_an_error():
    m = classification_metrics([], [])
    assert m["examples"] == 0 and m["accuracy"] == 0.0 and m["macro_f1"] == 0.0
    with pytest.raises(ValueError):
        classification_metrics(["a"], [])
