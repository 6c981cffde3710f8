"""Metrics from known confusion matrices, top-k accumulated on the device, and the
engine's tallies and running loss that feed them."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from cnnreg.core.records import Metric, Tally
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


def test_a_split_of_one_sample_scores_it():
    got = scores([[0, 0], [0, 1]])
    assert got["accuracy"] == 1.0 and got["balanced_accuracy"] == 1.0
    metric = top_k(k=1)
    hits = metric.init(2, torch.device("cpu"))
    metric.update(hits, torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert metric.compute(Tally(torch.tensor([[0, 0], [0, 1]]), 0.0, 1, hits)) == {"top1_accuracy": 1.0}


def test_per_class_scores_are_the_exact_ratios_of_the_counts():
    # Computed in double precision, each per-class value is the count ratio rounded once, as
    # Python's own division gives it: 1/3 is 0.333..., not a float32's 0.33333334.
    got = scores([[1, 2, 0], [0, 2, 5], [0, 0, 0]])
    assert got["precision_per_class"] == [1 / 1, 2 / 4, 0 / 5]
    assert got["recall_per_class"] == [1 / 3, 2 / 7, 0.0]
    assert got["f1_per_class"] == [2 * 1 / (1 + 3), 2 * 2 / (4 + 7), 0.0]
    assert got["balanced_accuracy"] == pytest.approx((1 / 3 + 2 / 7) / 2, rel=1e-15)


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


def test_top_k_without_its_counter_counts_no_hits():
    # A Tally made for the confusion-matrix metrics only (no accumulator of top_k's own):
    # nothing was counted, so no sample is a hit -- not a crash, and not one phantom hit.
    assert top_k(k=2).compute(tally([[3, 1], [0, 2]])) == {"top2_accuracy": 0.0}


def test_top_k_counts_exactly_past_float32_precision():
    # A float32 counter stops counting at 2**24 hits (2**24 + 1 rounds back to 2**24): a
    # training split of ~17M images would lose hits. Start from a counter that already holds
    # 2**24 (as loaded from a mid-epoch checkpoint) and count one more.
    metric = top_k(k=1)
    hits = metric.init(2, torch.device("cpu"))
    hits += 2**24
    metric.update(hits, torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))  # hit, miss
    assert int(hits) == 2**24 + 1
    result = metric.compute(Tally(torch.zeros(2, 2, dtype=torch.int64), 0.0, 2**25, hits))
    assert result == {"top1_accuracy": pytest.approx((2**24 + 1) / 2**25, rel=1e-12)}


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


# -- the engine's tallies: what a pass accumulates, read once ---------------------

# Two uneven batches of a three-class split, predictions readable from the logits:
# batch 1: true 0,0,1 predicted 0,1,1; batch 2: true 2,0 predicted 0,0.
# (2, 2) stays empty, so a confusion matrix that is short of C*C cells shows.
BATCHES = [
    (torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0]]), torch.tensor([0, 0, 1]), 0.5),
    (torch.tensor([[1.0, 0.0, 0.5], [4.0, 0.0, 3.0]]), torch.tensor([2, 0]), 2.0),
]
CONFUSION = ((2, 1, 0), (0, 1, 0), (1, 0, 0))  # by hand from BATCHES
# Top-2: the true class is among the two highest logits for all but the second sample
# (logits 0, 2, 1 for class 0): 4 hits of 5.
MEAN_LOSS = (0.5 * 3 + 2.0 * 2) / 5  # each batch's mean loss counts once per sample
CLASSES = ("cat", "dog", "eel")


def probe():
    """A metric plugin that keeps a per-class accumulator and shows what the engine gives it."""
    seen = {}

    def init(num_classes, device):
        seen["init"] = (num_classes, device)
        return torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(state, logits, targets):
        state += torch.bincount(targets, minlength=state.numel())  # samples per true class

    def compute(t):
        seen["tally"] = t
        return {"probe": 0.0}

    return Metric(names=("probe",), compute=compute, init=init, update=update), seen


def make_tallies(num_classes=3):
    from cnnreg.engine.tallies import Tallies

    metric, seen = probe()
    chosen = [("accuracy", accuracy()), ("recall", recall()), ("top_k", top_k(k=2)), ("probe", metric)]
    return Tallies(num_classes, chosen, torch.device("cpu")), seen


def feed(tallies, batches=BATCHES):
    for logits, targets, loss in batches:
        tallies.update(logits, targets, torch.tensor(loss))


def test_tallies_add_up_uneven_batches_into_one_result():
    tallies, seen = make_tallies()
    feed(tallies)
    result = tallies.read("val", CLASSES)
    assert (result.split, result.classes) == ("val", CLASSES)
    assert result.confusion == CONFUSION
    assert result.per_class["support"] == (3.0, 1.0, 1.0)
    assert result.per_class["recall"] == pytest.approx((2 / 3, 1.0, 0.0))
    assert result.metrics == pytest.approx(
        {"loss": MEAN_LOSS, "accuracy": 3 / 5, "recall": (2 / 3 + 1 + 0) / 3, "top2_accuracy": 4 / 5, "probe": 0.0}
    )
    assert all(type(v) is float for v in result.metrics.values())


def test_a_metric_plugin_gets_the_documented_tally():
    tallies, seen = make_tallies()
    feed(tallies)
    tallies.read("val", CLASSES)
    assert seen["init"] == (3, torch.device("cpu"))  # sized by the class count, on the run's device
    t = seen["tally"]
    assert t.confusion.dtype == torch.int64 and t.confusion.tolist() == [list(row) for row in CONFUSION]
    assert t.count == 5 and t.loss_sum == pytest.approx(0.5 * 3 + 2.0 * 2)
    assert t.extra.device.type == "cpu" and t.extra.tolist() == [3, 1, 1]  # its own state, updated every batch


def test_an_empty_pass_reads_zero_loss_and_one_sample_reads_its_loss():
    tallies, _ = make_tallies()
    assert tallies.read("val", CLASSES).metrics["loss"] == 0.0
    feed(tallies, [(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([1]), 0.75)])
    assert tallies.read("val", CLASSES).metrics["loss"] == 0.75


def test_a_pass_resumed_from_its_saved_state_reads_as_if_it_had_not_stopped():
    first, _ = make_tallies()
    feed(first, BATCHES[:1])
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)  # as a mid-epoch checkpoint keeps it
    buffer.seek(0)
    resumed, seen = make_tallies()
    resumed.load(torch.load(buffer))
    feed(resumed, BATCHES[1:])
    result = resumed.read("val", CLASSES)
    assert result.confusion == CONFUSION
    assert result.metrics["loss"] == pytest.approx(MEAN_LOSS)
    assert result.metrics["top2_accuracy"] == pytest.approx(4 / 5)
    assert seen["tally"].extra.tolist() == [3, 1, 1]


def test_a_bad_step_before_an_interruption_is_remembered_on_resume():
    # Interrupted (a signal) just after a NaN step, before the loss was checked: the resumed
    # epoch must still stop at that step, with that loss, not forget it or report step 0.
    first, _ = make_tallies()
    first.note_bad(torch.tensor(False), torch.tensor(1.0), 0)
    first.note_bad(torch.tensor(True), torch.tensor(float("nan")), 1)
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)
    buffer.seek(0)
    resumed, _ = make_tallies()
    resumed.load(torch.load(buffer))
    resumed.note_bad(torch.tensor(True), torch.tensor(50.0), 2)
    assert int(resumed.bad_step) == 1 and math.isnan(float(resumed.bad_loss))


def test_tallies_count_exactly_past_float32_precision():
    # float32 accumulators stop counting at 2**24 (2**24 + 1 rounds back): a long epoch,
    # resumed mid-way from a state that already holds 2**24 samples of class 0, adds one more.
    tallies, seen = make_tallies(num_classes=2)
    big = 2**24
    tallies.load({"loss_sum": torch.tensor(float(big), dtype=torch.float64), "count": torch.tensor(big),
                  "confusion": torch.tensor([big, 0, 0, 0]),
                  "extra": [None, None, torch.tensor(0), torch.zeros(2, dtype=torch.int64)]})
    tallies.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor(1.0))
    result = tallies.read("train", ("a", "b"))
    assert seen["tally"].count == big + 1
    assert result.confusion == ((big + 1, 0), (0, 0))
    assert result.metrics["loss"] == 1.0  # (2**24 + 1) / (2**24 + 1), exactly


def test_two_processes_sum_every_accumulator(monkeypatch):
    # The distributed tests run in other processes, out of the mutation run's sight: stand in
    # for two ranks that saw the same batches with an all-reduce that doubles each tensor.
    from cnnreg.core.distributed import DistInfo

    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: reduced.append(t) or t.mul_(2))
    tallies, seen = make_tallies()
    feed(tallies)
    tallies.all_reduce(DistInfo(rank=0, world_size=2))
    result = tallies.read("val", CLASSES)
    assert len(reduced) == 4  # loss sum, confusion (the count is its sum), top-k hits, the probe's state
    assert result.confusion == tuple(tuple(2 * v for v in row) for row in CONFUSION)
    assert result.metrics["loss"] == pytest.approx(MEAN_LOSS)
    assert result.metrics["top2_accuracy"] == pytest.approx(4 / 5)  # hits doubled with the count
    assert seen["tally"].extra.tolist() == [6, 2, 2]


def test_one_process_needs_no_all_reduce(monkeypatch):
    from cnnreg.core.distributed import DistInfo

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("all_reduce without a group"))
    tallies, _ = make_tallies()
    feed(tallies)
    tallies.all_reduce(DistInfo())
    assert tallies.read("val", CLASSES).confusion == CONFUSION


def test_tallies_remember_the_first_bad_step_and_its_loss():
    tallies, _ = make_tallies()
    steps = [(0, 7.5, True), (1, 1.0, False), (2, float("inf"), True)]  # the first bad step is the very first
    for index, loss, bad in steps:
        flag = torch.tensor(bad)
        assert tallies.note_bad(flag, torch.tensor(loss), index) is flag
    assert (int(tallies.bad_step), float(tallies.bad_loss)) == (0, 7.5)


def test_tallies_remember_a_later_first_bad_step_and_no_good_one():
    tallies, _ = make_tallies()
    assert int(tallies.bad_step) < 0  # nothing bad yet
    tallies.note_bad(torch.tensor(False), torch.tensor(1.0), 0)
    assert int(tallies.bad_step) < 0  # a good step is not remembered
    tallies.note_bad(torch.tensor(True), torch.tensor(float("nan"), dtype=torch.float64), 3)
    tallies.note_bad(torch.tensor(True), torch.tensor(9.0), 4)
    assert int(tallies.bad_step) == 3 and math.isnan(float(tallies.bad_loss))


# -- the running loss for progress displays -----------------------------------------


class NoCudaEvent:
    """As torch.cuda.Event is in a CPU-only build of torch: it cannot be made."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("Tried to instantiate dummy base class Event")


def test_on_the_cpu_the_loss_reader_gives_the_running_mean_at_once(monkeypatch):
    from cnnreg.engine.tallies import LossReader

    monkeypatch.setattr(torch.cuda, "Event", NoCudaEvent)  # works with CPU-only torch
    reader = LossReader(torch.device("cpu"))
    assert reader.poll(torch.zeros((), dtype=torch.float64), torch.tensor(0)) is None  # no sample yet
    assert reader.poll(torch.tensor(7.5, dtype=torch.float64), torch.tensor(3)) == 2.5


class FakeEvent:
    """Stands in for torch.cuda.Event: the test says when the copies have arrived."""

    def __init__(self):
        self.done, self.recorded = False, 0

    def record(self):
        self.recorded += 1

    def query(self):
        return self.done


class CopySpy(torch.overrides.TorchFunctionMode):
    """Sees whether host memory is pinned and device-to-host copies are non-blocking: on
    CUDA either one missing makes the copy wait for the GPU. (Pinning is dropped, as this
    machine may have no GPU.)"""

    def __init__(self):
        super().__init__()
        self.pinned, self.blocking_copies = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.zeros:
            self.pinned.append(bool(kwargs.pop("pin_memory", False)))
        if func is torch.Tensor.copy_ and not kwargs.get("non_blocking", False):
            self.blocking_copies += 1
        return func(*args, **kwargs)


def test_on_cuda_the_loss_reader_shows_the_latest_copy_that_arrived_without_waiting(monkeypatch):
    # CUDA's stream and event are faked so that this runs on any machine (and in mutation
    # runs); test_on_cuda_the_loss_reader_never_waits_for_the_gpu checks a real GPU.
    from cnnreg.engine.tallies import LossReader

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    spy = CopySpy()
    with spy:
        reader = LossReader(torch.device("cuda"))
        loss_sum, count = torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(1)
        assert reader.poll(loss_sum, count) is None  # the first copy is under way
        loss_sum.fill_(10.0), count.fill_(4)
        assert reader.poll(loss_sum, count) is None  # not arrived: no value, and no second copy
        assert reader.event.recorded == 1
        reader.event.done = True
        # the copy taken at the first poll (1/3 over one sample, in double precision), not today's
        assert reader.poll(loss_sum, count) == pytest.approx(1 / 3, rel=1e-12)
        assert reader.event.recorded == 2  # and the next copy started
        loss_sum.fill_(99.0)
        reader.event.done = False
        assert reader.poll(loss_sum, count) == pytest.approx(1 / 3, rel=1e-12)  # still the latest arrived
        reader.event.done = True
        assert reader.poll(loss_sum, count) == pytest.approx(10.0 / 4)
    assert spy.pinned == [True] and spy.blocking_copies == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_on_cuda_the_loss_reader_never_waits_for_the_gpu():
    from cnnreg.engine.tallies import LossReader

    reader = LossReader(torch.device("cuda"))
    loss_sum = torch.tensor(6.0, dtype=torch.float64, device="cuda")
    count = torch.tensor(4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = reader.poll(loss_sum, count)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first is None
    torch.cuda.synchronize()
    assert reader.poll(loss_sum, count) == 1.5


def test_training_steps_in_slots_add_up_like_batches_one_by_one():
    # The training path: losses go into per-step slots, summed when settled. The smaller
    # second batch must weigh 2 samples, not a full batch's 3.
    from cnnreg.engine.step import LossGuard

    tallies, _ = make_tallies()
    tallies.track_steps(len(BATCHES))
    for index, (logits, targets, loss) in enumerate(BATCHES):
        tallies.update_step(index, logits, targets, torch.tensor(loss))
    tallies.settle(LossGuard(1000, torch.device("cpu")))
    result = tallies.read("train", CLASSES)
    assert result.confusion == CONFUSION
    assert result.metrics["loss"] == pytest.approx(MEAN_LOSS)
    assert result.metrics["top2_accuracy"] == pytest.approx(4 / 5)
    assert int(tallies.bad_step) == -1


def test_settling_finds_the_first_bad_step_across_settles_and_a_resumed_epoch():
    from cnnreg.engine.step import LossGuard

    guard = LossGuard(1000, torch.device("cpu"))
    tallies, _ = make_tallies()
    tallies.track_steps(8, start=2)  # resumed at step 2 of 8
    one = (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    for index, loss in zip(range(2, 5), [2.0, 3.0, 2.5]):
        tallies.update_step(index, *one, torch.tensor(loss))
    tallies.settle(guard)  # a progress poll: all good so far, the reference is the first loss
    assert int(tallies.bad_step) == -1 and guard.reference_value() == 2.0
    for index, loss in zip(range(5, 8), [2.0 * 1000 + 1, float("nan"), 1.0]):  # diverged, then NaN
        tallies.update_step(index, *one, torch.tensor(loss))
    tallies.settle(guard)
    assert int(tallies.bad_step) == 5 and float(tallies.bad_loss) == pytest.approx(2001.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("losses, bad_at_1000, bad_at_0", [
    # no reference until the first finite loss (3: the limit is 3000)
    ([NAN, 3.0, 2000.0, 3001.0, 1.0], [True, False, False, True, False], [True, False, False, False, False]),
    # the reference counts as at least 1 (the limit is 1000, not 500)
    ([0.5, 999.0, 1001.0, INF, -INF], [False, False, True, True, True], [False, False, False, True, True]),
    ([2.0, 1.0, 2000.0, 2000.1, NAN], [False, False, False, True, True], [False, False, False, False, True]),
])
@pytest.mark.parametrize("factor", [1000, 0])
def test_the_guard_judges_steps_together_as_it_does_one_by_one(losses, bad_at_1000, bad_at_0, factor):
    from cnnreg.engine.step import LossGuard

    apart, together = LossGuard(factor, torch.device("cpu")), LossGuard(factor, torch.device("cpu"))
    one_by_one = [bool(apart.bad(torch.tensor(x))) for x in losses]
    assert one_by_one == (bad_at_1000 if factor else bad_at_0)  # by hand
    assert together.bad_of(torch.tensor(losses)).tolist() == one_by_one
    assert together.reference_value() == apart.reference_value()
