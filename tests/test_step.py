"""The training step and one epoch of it (cnnreg.engine.step), against hand-written torch references.

Whole runs are in test_engine.py; here each piece is called on a tiny real
run: seven batches of 8, 8, 8, 8, 8, 8 and 4 images (an uneven last batch),
a small CNN without dropout or batch norm, plain SGD, so a reference loop in
a few lines of torch reproduces the weights exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
import types
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cnnreg
from cnnreg.core.distributed import DistInfo
from cnnreg.core.records import Schedule
from cnnreg.core.stops import NonFiniteLoss, OutOfMemory
from cnnreg.engine import step
from cnnreg.engine.tallies import Tallies
from cnnreg.plugin.hookspecs import hookimpl

from conftest import tiny_recipe

BATCHES = 7  # 52 training images in batches of 8: six full ones and one of 4


def tiny_run(tmp_path, extra=(), **changes):
    settings = dict(data__train_size=52, data__batch_size=8, transforms={"train": [], "eval": []},
                    model={"name": "simple_cnn", "widths": [4, 4, 4]}, optimizer={"name": "sgd", "lr": 0.1},
                    trainer__epochs=3)
    recipe = tiny_recipe(tmp_path, **{**settings, **changes})
    return cnnreg.build(cnnreg.load_recipe(recipe, extra=list(extra)), output=False)


def epoch_batches(run, epoch):
    """The epoch's batches in the order training sees them (the same seed gives the same order)."""
    batches = run.batches["train"]
    batches.set_epoch(epoch)
    return list(batches.indexed())


def reference_weights(run, epoch, groups, lr=0.1, clip_norm=None):
    """Plain torch: for each group of batch positions, add up the gradients of loss / accumulate, one SGD step."""
    model = copy.deepcopy(run.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = epoch_batches(run, epoch)
    accumulate = run.recipe.trainer.accumulate
    for group in groups:
        for position in group:
            images, targets, _ = batches[position]
            (F.cross_entropy(model(images.float() / 255), targets) / accumulate).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


def assert_weights(run, expected):
    actual = [p.detach() for p in run.model.parameters()]
    assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-6) for a, e in zip(actual, expected))


def fresh_tallies(run):
    return Tallies(run.data.num_classes, run.metrics, run.device)


def train(run, epoch=1, skip=0, signals=None, timing=None, guard=None, tallies=None):
    tallies = tallies if tallies is not None else fresh_tallies(run)
    seconds = step.train_epoch(run, epoch, tallies, skip, signals or step.Signals(), timing or step.Timing(False),
                               guard or step.LossGuard(run.recipe.trainer.divergence, run.device))
    return seconds, tallies


class CountingLoss:
    """Cross-entropy that records each batch's loss and size; NaN at the calls listed in ``nan_at`` (0-based)."""

    def __init__(self, nan_at=(), on_call=None):
        self.losses, self.sizes, self.nan_at, self.on_call = [], [], set(nan_at), on_call

    def __call__(self, logits, targets):
        call = len(self.losses)
        if self.on_call is not None:
            self.on_call(call)
        loss = F.cross_entropy(logits, targets)
        if call in self.nan_at:
            loss = loss * float("nan")
        self.losses.append(float(loss.detach()))
        self.sizes.append(len(targets))
        return loss


# --- one epoch: accumulation, resume position, the step model -------------------------------------------------

@pytest.mark.parametrize("accumulate, groups", [
    (1, [[0], [1], [2], [3], [4], [5], [6]]),
    # groups end at every third batch of the epoch; the last, partial group of one steps too
    (3, [[0, 1, 2], [3, 4, 5], [6]]),
])
def test_an_epoch_trains_like_a_plain_torch_loop_with_accumulation(tmp_path, accumulate, groups):
    run = tiny_run(tmp_path, trainer__accumulate=accumulate)
    expected = reference_weights(run, 2, groups)
    _, tallies = train(run, epoch=2)
    assert_weights(run, expected)
    assert int(tallies.count) == 52  # every image counted once


def test_an_epoch_clips_each_steps_gradients_over_every_parameter(tmp_path):
    run = tiny_run(tmp_path, trainer__accumulate=3, trainer__grad_clip_norm=0.05)  # small enough to bind
    expected = reference_weights(run, 1, [[0, 1, 2], [3, 4, 5], [6]], clip_norm=0.05)
    train(run)
    assert_weights(run, expected)


def test_a_run_made_without_a_step_model_trains_its_model(tmp_path):
    run = replace(tiny_run(tmp_path), step_model=None)  # Run's default: the step calls run.model
    expected = reference_weights(run, 1, [[i] for i in range(BATCHES)])
    train(run)
    assert_weights(run, expected)


def test_training_hands_a_sample_aware_transform_each_batchs_indices_and_the_epoch(tmp_path):
    run = tiny_run(tmp_path)
    transform = SampleAware()
    batches = epoch_batches(run, 3)
    train(replace(run, train_transforms=(transform,)), epoch=3, skip=2)
    assert [epoch for _, epoch in transform.calls] == [3] * (BATCHES - 2)
    assert all(torch.equal(index, batch[2]) for (index, _), batch in zip(transform.calls, batches[2:]))


def test_resuming_mid_epoch_trains_only_the_remaining_batches_in_the_epochs_order(tmp_path):
    # four batches of epoch 2 were done: the group of positions 3-5 and the last one remain
    run = tiny_run(tmp_path, trainer__accumulate=3)
    expected = reference_weights(run, 2, [[3, 4, 5], [6]])
    _, tallies = train(run, epoch=2, skip=3)
    assert_weights(run, expected)
    assert int(tallies.count) == 3 * 8 + 4


class StepRecorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def cnnreg_optimizer_step(self, run, epoch, step, total_steps):
        self.calls.append((run, epoch, step, total_steps))


def test_the_step_event_counts_optimizer_steps_over_the_run_when_resumed(tmp_path):
    recorder = StepRecorder()
    run = tiny_run(tmp_path, extra=[recorder], trainer__accumulate=3)
    train(run, epoch=2, skip=3)
    # 3 steps an epoch (ceil(7 / 3)), 3 epochs: epoch 2's steps are 5 and 6 of 9 after the resume
    assert [(r is run, e, s, t) for r, e, s, t in recorder.calls] == [(True, 2, 5, 9), (True, 2, 6, 9)]


def test_the_step_hook_numbers_each_step_from_its_epoch_and_batch(tmp_path):
    recorder = StepRecorder()
    run = tiny_run(tmp_path, extra=[recorder], trainer__accumulate=3)
    call = step._step_hook(run, BATCHES)
    for epoch, index in [(1, 2), (1, 5), (1, 6), (2, 2), (3, 6)]:
        call(epoch, index)
    assert [c[1:] for c in recorder.calls] == [(1, 1, 9), (1, 2, 9), (1, 3, 9), (2, 4, 9), (3, 9, 9)]


def test_no_step_hook_is_made_when_no_plugin_listens(tmp_path):
    assert step._step_hook(tiny_run(tmp_path), BATCHES) is None


class FakeDDP(nn.Module):
    """Stands for DistributedDataParallel: records, per call, whether gradients would be all-reduced."""

    def __init__(self, module):
        super().__init__()
        self.module, self.synced, self.syncing = module, [], True

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.synced.append(self.syncing)
        return self.module(x)


def test_the_step_calls_the_wrapped_model_and_all_reduces_only_at_each_groups_last_batch(tmp_path):
    run = tiny_run(tmp_path, trainer__accumulate=3)
    wrapped = FakeDDP(run.model)
    run = replace(run, step_model=wrapped)
    train(run)
    assert wrapped.synced == [False, False, True, False, False, True, True]


def test_a_per_step_schedule_steps_with_the_optimizer_and_an_epoch_schedule_not_at_all(tmp_path):
    run = tiny_run(tmp_path, trainer__accumulate=3)
    per_step = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    train(replace(run, schedule=Schedule(per_step, interval="step")))
    assert per_step.last_epoch == 3  # three optimizer steps in seven batches
    per_epoch = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    train(replace(run, schedule=Schedule(per_epoch, interval="epoch")))
    assert per_epoch.last_epoch == 0  # the loop steps it after the epoch, not the step


def test_the_epoch_returns_its_wall_time(tmp_path):
    run = tiny_run(tmp_path)
    before = time.perf_counter()
    seconds, _ = train(run)
    assert 0 < seconds <= time.perf_counter() - before


# --- bad losses ------------------------------------------------------------------------------------------------

def test_a_skipped_bad_step_changes_nothing_and_training_goes_on(tmp_path):
    run = tiny_run(tmp_path, trainer__on_nan="skip")
    expected = reference_weights(run, 1, [[0], [2], [3], [4], [5], [6]])  # batch 1 left out
    loss = CountingLoss(nan_at={1})
    _, tallies = train(replace(run, loss_fn=loss))
    assert_weights(run, expected)
    assert len(loss.losses) == BATCHES
    assert int(tallies.count) == 52 - 8 and int(tallies.bad_step) == 1


class PartlyUsed(nn.Module):
    """A model with a parameter that only its second call uses (as a dropped block in stochastic depth)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.extra, self.calls = base, nn.Parameter(torch.ones(3)), 0

    def forward(self, x):
        self.calls += 1
        out = self.base(x)
        return out + self.extra if self.calls == 2 else out


def test_a_parameter_used_only_in_a_skipped_step_is_left_alone_by_later_steps(tmp_path):
    # the skip releases the bad gradients: were they zeroed instead, weight decay would move `extra`
    run = tiny_run(tmp_path, trainer__on_nan="skip")
    model = PartlyUsed(run.model)
    run = replace(run, model=model, step_model=model, loss_fn=CountingLoss(nan_at={1}),
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5))
    train(run)
    assert model.calls == BATCHES
    assert torch.equal(model.extra.detach(), torch.ones(3))


def test_the_first_bad_loss_is_noted_with_its_batch_for_the_epochs_end(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", math.inf)  # no report: the epoch runs to its end
    run = tiny_run(tmp_path)
    loss = CountingLoss(nan_at={2, 4})
    _, tallies = train(replace(run, loss_fn=loss))
    assert len(loss.losses) == BATCHES
    assert int(tallies.bad_step) == 2 and math.isnan(float(tallies.bad_loss))


def test_a_nan_loss_under_on_nan_stop_stops_at_the_next_progress_report(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)
    run = tiny_run(tmp_path)
    loss = CountingLoss(nan_at={2})
    with pytest.raises(NonFiniteLoss, match=r"the loss became NaN or infinite at epoch 2, step 3\. "):
        train(replace(run, loss_fn=loss), epoch=2)
    assert len(loss.losses) == 3  # not the rest of the epoch


def test_a_diverged_loss_says_how_far_and_the_rule_it_broke(tmp_path):
    run = tiny_run(tmp_path, trainer__divergence=50.0)
    tallies = fresh_tallies(run)
    tallies.note_bad(torch.tensor(True), torch.tensor(1234.0), 4)
    with pytest.raises(NonFiniteLoss) as info:
        step.raise_bad_step(run, 2, tallies)
    assert str(info.value) == (
        "the loss diverged to 1.23e+03, more than 50 times the run's first loss (trainer.divergence) at epoch 2, "
        "step 5. Lower the learning rate, add gradient clipping (trainer.grad_clip_norm), or set trainer.on_nan "
        "to \"skip\"")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_says_so_and_what_to_change(tmp_path, value):
    run = tiny_run(tmp_path)
    tallies = fresh_tallies(run)
    tallies.note_bad(torch.tensor(True), torch.tensor(value), 0)
    with pytest.raises(NonFiniteLoss) as info:
        step.raise_bad_step(run, 3, tallies)
    assert str(info.value) == (
        "the loss became NaN or infinite at epoch 3, step 1. Lower the learning rate, add gradient clipping "
        "(trainer.grad_clip_norm), or set trainer.on_nan to \"skip\"")


class Greedy(nn.Module):
    """Runs out of (pretend) device memory on its second call."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.base(x)


def test_out_of_memory_in_the_step_names_the_batch_and_what_to_lower(tmp_path):
    run = tiny_run(tmp_path)
    run = replace(run, step_model=Greedy(run.model))
    with pytest.raises(OutOfMemory) as info:
        train(run)
    assert str(info.value) == ("cpu ran out of memory on a train batch of 8 images at (12, 12): lower "
                               "data.batch_size (e.g. to 4), with trainer.accumulate 2 to keep the effective batch")


# --- signals -----------------------------------------------------------------------------------------------------

def test_a_signal_during_the_epoch_leaves_after_that_batch_with_the_place_to_resume(tmp_path):
    run = tiny_run(tmp_path)
    signals = step.Signals()
    loss = CountingLoss(on_call=lambda call: setattr(signals, "received", signal.SIGTERM) if call == 3 else None)
    expected = reference_weights(run, 2, [[0], [1], [2], [3]])
    with pytest.raises(step.LeaveAt) as info:
        train(replace(run, loss_fn=loss), epoch=2, signals=signals)
    assert (info.value.epoch, info.value.step) == (2, 4)
    assert_weights(run, expected)


def test_without_a_signal_the_epoch_runs_to_its_end(tmp_path):
    loss = CountingLoss()
    train(replace(tiny_run(tmp_path), loss_fn=loss), signals=step.Signals())
    assert len(loss.losses) == BATCHES


def fake_any_rank(calls, answer=lambda done: False, seen=None):
    """Stands for the all-reduce of the stop flag: records how many batches were done at each check."""

    def any_rank(flag, dist):
        assert dist.world_size == 2
        done = len(seen.losses) if seen is not None else None
        calls.append((flag, done))
        return flag or answer(done)

    return any_rank


def test_under_torchrun_the_ranks_agree_on_a_stop_every_16_steps_and_at_the_epochs_end(tmp_path, monkeypatch):
    calls = []
    run = tiny_run(tmp_path, data__train_size=36, data__batch_size=2)  # 18 batches
    loss = CountingLoss()
    monkeypatch.setattr(step, "any_rank", fake_any_rank(calls, seen=loss))
    train(replace(run, loss_fn=loss), signals=step.Signals(DistInfo(rank=0, world_size=2)))
    assert calls == [(False, 16), (False, 18)]


def test_under_torchrun_a_signal_on_another_rank_stops_this_one_at_the_agreed_step(tmp_path, monkeypatch):
    calls = []
    run = tiny_run(tmp_path, data__train_size=36, data__batch_size=2)
    loss = CountingLoss()
    monkeypatch.setattr(step, "any_rank", fake_any_rank(calls, answer=lambda done: True, seen=loss))
    with pytest.raises(step.LeaveAt) as info:
        train(replace(run, loss_fn=loss), epoch=3, signals=step.Signals(DistInfo(rank=0, world_size=2)))
    assert (info.value.epoch, info.value.step) == (3, 16)


@pytest.mark.parametrize("received", [None, signal.SIGINT])
def test_signals_check_agreement_at_every_16th_step_the_epochs_last_and_its_end(monkeypatch, received):
    calls = []
    monkeypatch.setattr(step, "any_rank", fake_any_rank(calls))
    signals = step.Signals(DistInfo(rank=0, world_size=2))
    signals.received = received
    checked, answers = [], []
    for i in range(40):  # 40 steps in the epoch
        before = len(calls)
        answers.append(signals.leave_now(i, last=i == 39))
        if len(calls) > before:
            checked.append(i)
    assert checked == [15, 31, 39]
    assert [i for i, answer in enumerate(answers) if answer] == (checked if received else [])
    assert all(flag == (received is not None) for flag, _ in calls)  # this rank's own flag goes into the vote
    assert signals.leave_now() == (received is not None)  # the epoch's end: always agreed
    assert signals.leave_now(4) == (received is not None)  # not told it is not the last: agreed too
    assert len(calls) == 5


def test_a_single_process_leaves_at_the_first_step_after_a_signal(monkeypatch):
    monkeypatch.setattr(step, "any_rank", lambda flag, dist: pytest.fail("no all-reduce without torchrun"))
    signals = step.Signals()
    assert not signals.leave_now(0, last=False) and not signals.leave_now()
    signals.received = signal.SIGINT
    assert signals.leave_now(0, last=False) and signals.leave_now()


# --- progress reports --------------------------------------------------------------------------------------------

class ProgressRecorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def cnnreg_train_progress(self, run, progress):
        self.calls.append((run, progress))


def test_progress_reports_the_position_images_and_running_loss_of_the_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)
    recorder = ProgressRecorder()
    run = tiny_run(tmp_path, extra=[recorder], data__train_size=48)  # six full batches
    loss = CountingLoss()
    run = replace(run, loss_fn=loss)
    before = time.perf_counter()
    train(run, epoch=2)
    wall = time.perf_counter() - before
    records = [p for r, p in recorder.calls]
    assert all(r is run for r, _ in recorder.calls)
    assert [(p.epoch, p.epochs, p.step, p.steps, p.images) for p in records] == [
        (2, 3, i, 6, 8 * i) for i in range(1, 7)]
    # the running loss: the mean over the images so far, each batch weighted by its size
    running = [sum(l * n for l, n in zip(loss.losses[:i], loss.sizes[:i])) / sum(loss.sizes[:i]) for i in range(1, 7)]
    assert [p.loss for p in records] == pytest.approx(running)
    seconds = [p.seconds for p in records]
    assert 0 <= seconds[0] and seconds == sorted(seconds) and seconds[-1] <= wall


def test_progress_after_a_resume_counts_from_the_resumed_position(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)
    recorder = ProgressRecorder()
    run = tiny_run(tmp_path, extra=[recorder], data__train_size=48)
    train(run, epoch=2, skip=4)
    assert [(p.step, p.images) for _, p in recorder.calls] == [(5, 40), (6, 48)]


class Clock:
    """time.perf_counter that returns the given instants, one per call."""

    def __init__(self, *instants):
        self.instants = iter(instants)

    def perf_counter(self):
        return next(self.instants)


def test_progress_is_reported_once_each_interval_has_passed(tmp_path, monkeypatch):
    recorder = ProgressRecorder()
    run = tiny_run(tmp_path, extra=[recorder])
    tallies = fresh_tallies(run)
    tallies.update(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long), torch.tensor(0.5))
    i = step.PROGRESS_INTERVAL
    # made at 0; batches done at 0.4, 1.0 (exactly one interval), 1.2 and 2.4 intervals
    monkeypatch.setattr(step, "time", types.SimpleNamespace(perf_counter=Clock(0.0, 0.4 * i, i, 1.2 * i, 2.4 * i).perf_counter))
    progress = step._Progress(run, 1, BATCHES, done=0, guard=step.LossGuard(1000, run.device))
    for index in range(4):
        progress.batch_done(index, tallies, start=0.0)
    assert [(p.step, p.images, p.seconds, p.loss) for _, p in recorder.calls] == [
        (2, 16, i, 0.5), (4, 32, 2.4 * i, 0.5)]


# --- the pieces of a step ----------------------------------------------------------------------------------------

class SampleAware:
    """A transform that asks for each sample's index and the epoch (as the alternating flip does)."""

    uses_sample_index = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, index, epoch):
        self.calls.append((index, epoch))
        return x * 2


def test_forward_backward_gives_the_logits_the_loss_and_its_gradient_over_accumulate(tmp_path):
    run = tiny_run(tmp_path, trainer__accumulate=4)
    transform = SampleAware()
    run = replace(run, train_transforms=(transform,))
    images, targets, index = epoch_batches(run, 1)[0]
    reference = copy.deepcopy(run.model)
    want_logits = reference(images.float() / 255 * 2)
    want_loss = F.cross_entropy(want_logits, targets)
    (want_loss / 4).backward()
    logits, loss = step.forward_backward(run, run.model, images, targets, index, 5, sync=True)
    assert logits.dtype == torch.float32 and torch.allclose(logits, want_logits) and torch.allclose(loss, want_loss)
    assert all(torch.allclose(p.grad, q.grad) for p, q in zip(run.model.parameters(), reference.parameters()))
    assert len(transform.calls) == 1 and torch.equal(transform.calls[0][0], index) and transform.calls[0][1] == 5


def test_forward_backward_on_a_model_without_no_sync_and_within_a_group(tmp_path):
    run = tiny_run(tmp_path)
    images, targets, index = epoch_batches(run, 1)[0]
    logits, _ = step.forward_backward(run, run.model, images, targets, index, 1, sync=False)
    assert logits.shape == (8, 3)


def test_forward_backward_scales_the_loss_for_a_gradient_scaler(tmp_path):
    run = tiny_run(tmp_path, trainer__accumulate=2)
    images, targets, index = epoch_batches(run, 1)[0]
    reference = copy.deepcopy(run.model)
    (F.cross_entropy(reference(images.float() / 255), targets) / 2).backward()
    scaled = replace(run, scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    step.forward_backward(scaled, run.model, images, targets, index, 1, sync=True)
    assert all(torch.allclose(p.grad, 16 * q.grad) for p, q in zip(run.model.parameters(), reference.parameters()))


def test_forward_runs_under_bf16_autocast_when_the_run_says_so(tmp_path):
    run = replace(tiny_run(tmp_path), precision="bf16")
    images, targets, index = epoch_batches(run, 1)[0]
    logits, loss = step.forward_backward(run, run.model, images, targets, index, 1, sync=True)
    assert logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in run.model.parameters())


def test_prepare_scales_to_0_1_and_gives_the_model_its_dtype_and_memory_format(tmp_path):
    run = tiny_run(tmp_path)
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).reshape(2, 3, 4, 5)
    transform = SampleAware()
    x = step.prepare(run, images, [transform])
    assert torch.equal(x, images.float() / 255 * 2) and x.dtype == torch.float32
    assert transform.calls == [(None, 0)]  # outside training: no indices, epoch 0
    index = torch.tensor([7, 3])
    step.prepare(run, images, [transform], index, 6)
    assert transform.calls[1][0] is index and transform.calls[1][1] == 6
    assert step.prepare(replace(run, precision="bf16-true"), images, []).dtype == torch.bfloat16
    assert step.prepare(replace(run, channels_last=True), images, []).is_contiguous(memory_format=torch.channels_last)
    assert not step.prepare(run, images, []).is_contiguous(memory_format=torch.channels_last)


def sgd_run(tmp_path, params, **trainer):
    run = tiny_run(tmp_path, **{f"trainer__{k}": v for k, v in trainer.items()})
    return replace(run, optimizer=torch.optim.SGD(params, lr=0.5))


@pytest.mark.parametrize("trainer, clipped", [
    ({}, [3.0, -4.0, 0.0, 12.0]),
    ({"grad_clip_value": 1.0}, [1.0, -1.0, 0.0, 1.0]),
    # total norm 13: scaled by 2.6 / (13 + 1e-6), as torch's clip_grad_norm_
    ({"grad_clip_norm": 2.6}, [v * 2.6 / (13 + 1e-6) for v in (3.0, -4.0, 0.0, 12.0)]),
    # each element first, then the norm of what is left (sqrt 3)
    ({"grad_clip_value": 1.0, "grad_clip_norm": 0.75},
     [v * 0.75 / (math.sqrt(3) + 1e-6) for v in (1.0, -1.0, 0.0, 1.0)]),
])
def test_the_optimizer_step_clips_as_the_trainer_says(tmp_path, trainer, clipped):
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))  # the norm is over every parameter
    a.grad, b.grad = torch.tensor([3.0, -4.0, 0.0]), torch.tensor([12.0])
    step.optimizer_step(sgd_run(tmp_path, [a, b], **trainer), [a, b])
    assert torch.cat([a.detach(), b.detach()]).tolist() == pytest.approx([-0.5 * v for v in clipped], rel=1e-6)
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("trainer", [{}, {"grad_clip_value": 1.0}, {"grad_clip_norm": 0.5}])
def test_with_a_gradient_scaler_the_step_clips_the_unscaled_gradients(tmp_path, trainer):
    a = nn.Parameter(torch.zeros(2))
    run = replace(sgd_run(tmp_path, [a], **trainer), scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    run.scaler.scale((a * torch.tensor([3.0, -4.0])).sum()).backward()  # gradients 8 * (3, -4)
    step.optimizer_step(run, [a])
    clipped = {(): [3.0, -4.0], ("grad_clip_value",): [1.0, -1.0],
               ("grad_clip_norm",): [3.0 * 0.5 / (5 + 1e-6), -4.0 * 0.5 / (5 + 1e-6)]}[tuple(trainer)]
    assert a.detach().tolist() == pytest.approx([-0.5 * v for v in clipped], rel=1e-6)


def test_a_parameter_without_a_gradient_is_not_moved_by_the_next_step(tmp_path):
    # the gradients are released after a step, not zeroed: weight decay and momentum skip an unused parameter
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    run = replace(tiny_run(tmp_path), optimizer=torch.optim.SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.5))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    step.optimizer_step(run, [a, b])
    after_first = b.detach().clone()
    a.grad = torch.ones(2)  # b takes no part in the second step
    step.optimizer_step(run, [a, b])
    assert torch.equal(b.detach(), after_first)


# --- divergence guard and timing ---------------------------------------------------------------------------------

def guard_flags(factor, losses):
    guard = step.LossGuard(factor, torch.device("cpu"))
    return [bool(guard.bad(torch.tensor(v))) for v in losses], guard


@pytest.mark.parametrize("factor, losses, bad", [
    # the first loss is the reference, taken as at least 1: more than factor times it is bad, equal is not
    (10, [4.0, 40.0, 40.5], [False, False, True]),
    (10, [0.5, 10.0, 15.0], [False, False, True]),
    (0.5, [4.0, 2.0, 2.5], [True, False, True]),  # below 1 even the first loss is over the line
    (1, [2.0, 2.5], [False, True]),
    # a first loss of exactly 0 stays the reference (as 1), the next loss does not replace it
    (1000, [0.0, 3.0, 1500.0], [False, False, True]),
    # a non-finite first loss is bad and sets no reference; the next finite one does
    (10, [float("nan"), 2.0, 25.0, float("inf")], [True, False, True, True]),
    # factor 0: only non-finite losses are bad
    (0, [1.0, 1e9, float("nan"), float("-inf")], [False, False, True, True]),
])
def test_the_divergence_rule(factor, losses, bad):
    assert guard_flags(factor, losses)[0] == bad


@pytest.mark.parametrize("losses, reference", [([], None), ([float("nan")], None), ([0.0, 5.0], 0.0),
                                               ([0.5, 0.25], 0.5), ([7.0, 3.0], 7.0)])
def test_the_reference_loss_is_the_first_finite_one_and_survives_a_restore(losses, reference):
    _, guard = guard_flags(1000, losses)
    assert guard.reference_value() == reference
    restored = step.LossGuard(1000, torch.device("cpu"))
    restored.restore(guard.reference_value())
    assert restored.reference_value() == reference
    if reference is not None:  # the restored reference is the one the rule uses
        assert not bool(restored.bad(torch.tensor(1000 * max(reference, 1.0))))
        assert bool(restored.bad(torch.tensor(1000 * max(reference, 1.0) * 1.01)))


def test_compilation_time_is_the_first_batch_of_each_kind_of_pass_once():
    timing = step.Timing(measure_first=True)
    cpu = torch.device("cpu")
    timing.first_batch_done(cpu, time.perf_counter() - 0.5, "train")
    assert timing.compiled_train and not timing.compiled_eval and 0.5 <= timing.compile_seconds < 1.0
    timing.first_batch_done(cpu, time.perf_counter() - 10, "train")  # a later train batch: not compilation
    assert timing.compile_seconds < 1.0
    timing.first_batch_done(cpu, time.perf_counter() - 0.25, "eval")
    assert timing.compiled_eval and 0.75 <= timing.compile_seconds < 1.25
    timing.first_batch_done(cpu, time.perf_counter() - 10, "eval")
    assert timing.compile_seconds < 1.25


def test_without_compilation_no_time_is_counted_as_compiling():
    timing = step.Timing(measure_first=False)
    timing.first_batch_done(torch.device("cpu"), time.perf_counter() - 1, "train")
    timing.first_batch_done(torch.device("cpu"), time.perf_counter() - 1, "eval")
    assert timing.compile_seconds == 0.0 and not timing.compiled_train and not timing.compiled_eval


class SlowFirst(nn.Module):
    """Its first call takes 0.2 s, as compiling would."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.2)
        return self.base(x)


def test_a_compiled_epoch_counts_its_first_train_batch_as_compilation(tmp_path):
    run = tiny_run(tmp_path)
    run = replace(run, step_model=SlowFirst(run.model))
    timing = step.Timing(measure_first=True)
    seconds, _ = train(run, timing=timing)
    assert timing.compiled_train and not timing.compiled_eval
    assert 0.2 <= timing.compile_seconds < seconds


def test_synchronized_since_is_the_time_since_start():
    start = time.perf_counter() - 0.5
    assert 0.5 <= step.synchronized_since(torch.device("cpu"), start) < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_synchronized_since_returns_once_the_runs_gpu_has_finished_its_queued_work():
    # the last GPU, which need not be the current one: a single-process run on cuda:1 does not make it current
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize(device)
    done = torch.cuda.Event()
    for _ in range(50):  # tens of milliseconds of work, queued in microseconds
        x = (x @ x).clamp_(-1, 1)
    done.record(torch.cuda.current_stream(device))
    step.synchronized_since(device, time.perf_counter())
    assert done.query()
