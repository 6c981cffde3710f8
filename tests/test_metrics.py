"""Metrics from known confusion matrices, and top-k accumulated on the device."""

from __future__ import annotations

import random

import pytest
import torch

from cnnreg.core.records import Tally
from cnnreg_plugins import metrics
from cnnreg_plugins.metrics import accuracy, balanced_accuracy, f1, precision, recall, top_k

CONFUSION_METRICS = {
    "accuracy": accuracy,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "balanced_accuracy": balanced_accuracy,
}


def tally(rows: list[list[int]], extra: torch.Tensor | None = None) -> Tally:
    confusion = torch.tensor(rows, dtype=torch.int64)
    return Tally(confusion=confusion, loss_sum=0.0, count=int(confusion.sum()), extra=extra)


def scores(rows: list[list[int]]) -> dict:
    t = tally(rows)
    out: dict = {}
    for factory in CONFUSION_METRICS.values():
        out.update(factory().compute(t))
    return out


def test_the_plugin_registers_its_metrics():
    assert metrics.cnnreg_metrics() == {**CONFUSION_METRICS, "top_k": top_k}


def test_a_known_confusion_matrix():
    got = scores([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    assert got["accuracy"] == pytest.approx(12 / 16)
    assert got["precision_per_class"] == pytest.approx([5 / 7, 3 / 4, 4 / 5])
    assert got["precision"] == pytest.approx((5 / 7 + 3 / 4 + 4 / 5) / 3)
    assert got["recall_per_class"] == pytest.approx([5 / 6, 3 / 6, 4 / 4])
    assert got["recall"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert got["f1_per_class"] == pytest.approx([10 / 13, 6 / 10, 8 / 9])
    assert got["f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert got["balanced_accuracy"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)


def test_f1_is_the_harmonic_mean_of_precision_and_recall():
    got = scores([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    for p, r, f in zip(got["precision_per_class"], got["recall_per_class"], got["f1_per_class"]):
        assert f == pytest.approx(2 * p * r / (p + r))


def test_classes_never_predicted_or_absent_score_zero_and_absent_ones_leave_the_averages():
    # class 1: one sample, never predicted; class 2: neither a sample nor a prediction.
    got = scores([[2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]])
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["precision_per_class"] == pytest.approx([2 / 3, 0, 0, 1])
    assert got["recall_per_class"] == pytest.approx([1, 0, 0, 1])
    assert got["f1_per_class"] == pytest.approx([0.8, 0, 0, 1])
    assert got["precision"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(1.8 / 3)
    assert got["balanced_accuracy"] == pytest.approx(2 / 3)


def test_a_class_predicted_but_without_samples_counts_in_macro_averages_not_in_balanced_accuracy():
    got = scores([[1, 1], [0, 0]])
    assert got["precision_per_class"] == pytest.approx([1, 0])
    assert got["recall_per_class"] == pytest.approx([0.5, 0])
    assert got["precision"] == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(0.25)
    assert got["f1"] == pytest.approx((2 / 3) / 2)
    assert got["balanced_accuracy"] == pytest.approx(0.5)


def test_an_empty_split_scores_zero_everywhere():
    got = scores([[0, 0], [0, 0]])
    assert {k: v for k, v in got.items() if not k.endswith("_per_class")} == dict.fromkeys(CONFUSION_METRICS, 0.0)
    assert got["f1_per_class"] == [0.0, 0.0]


def test_a_perfect_classifier_scores_one():
    got = scores([[3, 0, 0], [0, 4, 0], [0, 0, 1]])
    assert {k: v for k, v in got.items() if not k.endswith("_per_class")} == pytest.approx(
        dict.fromkeys(CONFUSION_METRICS, 1.0)
    )


def reference(y_true: list[int], y_pred: list[int], num_classes: int) -> dict[str, float]:
    """Straight from the definitions, sample by sample (scikit-learn's, zero_division=0)."""
    labels = sorted(set(y_true) | set(y_pred))
    precisions, recalls, f1s, present_recalls = {}, {}, {}, []
    for c in range(num_classes):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        predicted = sum(p == c for p in y_pred)
        actual = sum(t == c for t in y_true)
        precisions[c] = tp / predicted if predicted else 0.0
        recalls[c] = tp / actual if actual else 0.0
        pr = precisions[c] + recalls[c]
        f1s[c] = 2 * precisions[c] * recalls[c] / pr if pr else 0.0
        if actual:
            present_recalls.append(recalls[c])
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
        "precision": sum(precisions[c] for c in labels) / len(labels),
        "recall": sum(recalls[c] for c in labels) / len(labels),
        "f1": sum(f1s[c] for c in labels) / len(labels),
        "balanced_accuracy": sum(present_recalls) / len(present_recalls),
    }


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions_agree_with_the_definitions(seed):
    rng = random.Random(seed)
    num_classes = rng.randint(2, 7)
    n = rng.randint(1, 60)
    y_true = [rng.randrange(num_classes) for _ in range(n)]
    y_pred = [t if rng.random() < 0.5 else rng.randrange(num_classes) for t in y_true]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    got = scores(confusion.tolist())
    expected = reference(y_true, y_pred, num_classes)
    assert {k: got[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("factory", CONFUSION_METRICS.values(), ids=lambda f: f.__name__)
def test_compute_returns_its_names_as_floats_and_per_class_lists(factory):
    metric = factory()
    assert metric.init is None and metric.update is None  # the confusion matrix is enough
    out = metric.compute(tally([[5, 1, 0], [2, 3, 1], [0, 0, 4]]))
    assert set(metric.names) <= set(out)
    for name, value in out.items():
        if name in metric.names:
            assert type(value) is float
        else:
            assert name == f"{metric.names[0]}_per_class"
            assert isinstance(value, list) and len(value) == 3 and all(type(v) is float for v in value)


def test_top_k_counts_hits_over_batches_in_place():
    metric = top_k(k=2)
    assert metric.names == ("top2_accuracy",)
    hits = metric.init(4, torch.device("cpu"))
    logits = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 2.0, -1.0]])
    metric.update(hits, logits, torch.tensor([1, 0, 1]))  # hit, miss, hit
    metric.update(hits, logits[:1], torch.tensor([3]))  # miss
    assert int(hits) == 2
    assert metric.compute(Tally(torch.zeros(4, 4, dtype=torch.int64), 0.0, 4, hits)) == {"top2_accuracy": 0.5}


def test_top_1_is_accuracy():
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 5), torch.randint(0, 5, (50,))
    metric = top_k(k=1)
    hits = metric.init(5, torch.device("cpu"))
    metric.update(hits, logits, targets)
    assert int(hits) == int((logits.argmax(1) == targets).sum())


def test_top_k_with_fewer_classes_than_k_counts_every_sample():
    metric = top_k()
    hits = metric.init(3, torch.device("cpu"))
    metric.update(hits, torch.randn(6, 3), torch.randint(0, 3, (6,)))
    assert metric.compute(Tally(torch.zeros(3, 3, dtype=torch.int64), 0.0, 6, hits)) == {"top5_accuracy": 1.0}


def test_top_k_of_an_empty_split_is_zero():
    metric = top_k()
    hits = metric.init(10, torch.device("cpu"))
    assert metric.compute(Tally(torch.zeros(10, 10, dtype=torch.int64), 0.0, 0, hits)) == {"top5_accuracy": 0.0}


def test_top_k_refuses_k_below_one():
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(k=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_top_k_update_never_waits_for_the_gpu():
    metric = top_k(k=3)
    hits = metric.init(10, torch.device("cuda"))
    logits, targets = torch.randn(64, 10, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            metric.update(hits, logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = 3 * int((logits.topk(3, 1).indices == targets[:, None]).any(1).sum())
    assert int(hits) == expected


def test_tallies_count_true_classes_in_rows_and_predictions_in_columns():
    """Orientation, from logits a reader can check by hand: three samples of class 0, all
    predicted as class 1, and one of class 1 predicted right. A transposed matrix swaps
    precision and recall, which a symmetric example cannot show."""
    from cnnreg.engine.tallies import Tallies

    tallies = Tallies(2, [("precision", precision()), ("recall", recall())], torch.device("cpu"))
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    tallies.update(logits, torch.tensor([0, 0, 0, 1]), torch.tensor(1.0))
    result = tallies.read("val", ("cat", "dog"))
    assert result.confusion == ((0, 3), (0, 1))  # row: the true class; column: the prediction
    assert result.per_class["support"] == (3.0, 1.0)
    assert result.per_class["recall"] == pytest.approx((0.0, 1.0))  # no cat found; the one dog found
    assert result.per_class["precision"] == pytest.approx((0.0, 0.25))  # 1 of the 4 "dog" answers right
