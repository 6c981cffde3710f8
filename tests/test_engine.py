"""The engine on the CPU: training reaches an accuracy, resumes exactly, fails clearly."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import cnnreg
from cnnreg.engine import step
from cnnreg.core.errors import RecipeError
from cnnreg.core.stops import Interrupted, NonFiniteLoss
from cnnreg.plugin.hookspecs import hookimpl

from conftest import tiny_recipe


def test_training_lowers_the_loss_and_beats_chance(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=6))
    run = cnnreg.build(recipe)
    result = cnnreg.fit(run)
    first, last = result.records[0].metrics, result.records[-1].metrics
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["val_accuracy"] > 0.6  # three classes: chance is 1/3
    test = cnnreg.evaluate(run, "test")
    assert test.metrics["accuracy"] > 0.6
    assert sum(test.per_class["support"]) == 48 and len(test.confusion) == 3
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 6 and summary["best_epoch"] == result.best_epoch
    assert json.loads((run.run_dir / "recipe.json").read_text())["trainer"]["epochs"] == 6
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["versions"]["torch"] == torch.__version__ and info["plugins"]["tutorial_models"].startswith("cnnreg-framework")


class InterruptAt:
    """Sends this process SIGINT at a given point of training, as Ctrl-C would."""

    def __init__(self, epoch: int, step: int | None = None):
        self.epoch, self.step = epoch, step

    @hookimpl
    def cnnreg_epoch_end(self, run, record):
        if self.step is None and record.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)

    @hookimpl
    def cnnreg_train_progress(self, run, progress):
        if self.step is not None and (progress.epoch, progress.step) == (self.epoch, self.step):
            os.kill(os.getpid(), signal.SIGINT)


def final_weights(run):
    return {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.mark.parametrize("at", [{"epoch": 1}, {"epoch": 2, "step": 2}], ids=["after-epoch-1", "mid-epoch-2"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, at):
    monkeypatch.setattr(step, "PROGRESS_INTERVAL", 0.0)
    changes = dict(trainer__epochs=3, trainer__deterministic=True,
                   transforms={"train": [{"name": "random_crop", "size": 12, "padding": 2}, {"name": "normalize"}],
                               "eval": [{"name": "normalize"}]})
    straight = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "a", **changes)))
    cnnreg.fit(straight)

    interrupted = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "b", **changes), extra=[InterruptAt(**at)]))
    with pytest.raises(Interrupted) as info:
        cnnreg.fit(interrupted)
    assert info.value.exit_code == 130
    assert f"cnnreg run --resume {interrupted.run_dir}" in str(info.value)
    assert (interrupted.run_dir / "last.pt").exists()

    resumed = cnnreg.build(cnnreg.load_recipe(interrupted.run_dir / "recipe.json"), run_dir=interrupted.run_dir)
    result = cnnreg.fit(resumed, resume=True)
    assert [r.epoch for r in result.records] == [1, 2, 3]
    expected, actual = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_gradient_accumulation_clipping_and_step_schedules_train(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(
        tmp_path, trainer__epochs=3, trainer__accumulate=2, trainer__grad_clip_norm=1.0,
        trainer__grad_clip_value=5.0, scheduler={"name": "onecycle"}, data__batch_size=16))
    run = cnnreg.build(recipe, output=False)
    result = cnnreg.fit(run)
    assert result.records[-1].metrics["val_accuracy"] > 0.5
    # one scheduler step per optimizer step (6 a epoch): exactly its total, or torch would raise
    assert run.schedule.scheduler.last_epoch == run.schedule.scheduler.total_steps == 18
    assert result.records[-1].metrics["lr"] < 0.05 * 0.01


class NanLoss:
    """A loss that becomes NaN from a given step on."""

    @hookimpl
    def cnnreg_losses(self):
        def nan_after(steps: int = 4):
            """Cross-entropy that turns NaN after some steps."""
            calls = {"n": 0}

            def loss(logits, targets):
                calls["n"] += 1
                value = torch.nn.functional.cross_entropy(logits, targets)
                return value * float("nan") if calls["n"] > steps else value
            return loss
        return {"nan_after": nan_after}


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=3, loss={"name": "nan_after", "steps": 8}),
                                extra=[NanLoss()])
    run = cnnreg.build(recipe)
    with pytest.raises(NonFiniteLoss) as info:
        cnnreg.fit(run)
    # six training steps and one validation batch per epoch: the ninth call is epoch 2, step 2
    assert "became NaN or infinite at epoch 2, step 2" in str(info.value)
    assert f"last.pt holds epoch 1: resume from epoch 1 with: cnnreg run --resume {run.run_dir}" in str(info.value)
    state = torch.load(run.run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_loss_can_skip_the_step(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=2, trainer__on_nan="skip",
                                            loss={"name": "nan_after", "steps": 8}), extra=[NanLoss()])
    run = cnnreg.build(recipe, output=False)
    cnnreg.fit(run)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize("changes, message", [
    ({"trainer__monitor": "val_acc"}, "trainer.monitor: no metric called 'val_acc'; did you mean 'val_accuracy'?"),
    ({"model": {"name": "simple_cnn", "num_classes": 5}},
     "model.num_classes: the model outputs (2, 5) for a batch of 2, but the dataset has 3 classes"),
    ({"transforms": {"train": [{"name": "random_crop", "size": 40}]}},
     "transforms.train[0]: on a batch of (2, 3, 12, 12): random_crop size 40x40 is larger than the 12x12 image"),
    ({"scheduler": {"name": "reduce_on_plateau", "monitor": "val_los"}},
     "scheduler.monitor: no metric called 'val_los'"),
])
def test_semantic_errors_before_training(tmp_path, changes, message):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, **changes))
    with pytest.raises(RecipeError) as info:
        cnnreg.build(recipe)
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_predict_gives_the_trained_class_of_training_images(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=8))
    run = cnnreg.build(recipe, output=False)
    cnnreg.fit(run)
    images, labels = run.data.train.images[:24], run.data.train.labels[:24]
    predictions = cnnreg.predict(run, list(images), top_k=2)
    predicted = torch.tensor([p.indices[0] for p in predictions])
    assert (predicted == labels).float().mean() >= 0.75
    assert all(p.classes[0] == run.classes[p.indices[0]] for p in predictions)
    assert all(1 >= p.confidences[0] >= p.confidences[1] >= 0 for p in predictions)


def test_cross_validation_reports_mean_and_std_per_metric(tmp_path):
    from cnnreg.workflows.crossval import cross_validate

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=1, cross_validation={"folds": 2}))
    result = cross_validate(recipe)
    assert len(result.folds) == 2
    assert set(result.mean) == set(result.std) and "val_accuracy" in result.mean
    values = [r.best.metrics["val_accuracy"] for r in result.folds]
    assert result.mean["val_accuracy"] == pytest.approx(sum(values) / 2)
    summary = json.loads((result.run_dir / "crossval.json").read_text())
    assert len(summary["per_fold"]) == 2
    assert (result.run_dir / "fold-1" / "summary.json").exists() and (result.run_dir / "fold-2" / "summary.json").exists()


class OomModel:
    """A model that runs out of (pretend) device memory on its third training batch."""

    @hookimpl
    def cnnreg_models(self):
        def greedy_net(num_classes: int = 10, in_channels: int = 3) -> torch.nn.Module:
            """Runs out of memory in training."""

            class Greedy(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.calls = 0
                    self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                    torch.nn.Linear(in_channels, num_classes))

                def forward(self, x):
                    if self.training:
                        self.calls += 1
                        if self.calls == 3:
                            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                    return self.head(x)
            return Greedy()
        return {"greedy_net": greedy_net}


def test_out_of_memory_says_the_batch_size_and_what_to_change(tmp_path):
    from cnnreg.core.stops import OutOfMemory

    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, model={"name": "greedy_net"}), extra=[OomModel()])
    run = cnnreg.build(recipe)
    with pytest.raises(OutOfMemory) as info:
        cnnreg.fit(run)
    message = str(info.value)
    assert "ran out of memory on a train batch of 32 images" in message
    assert "lower data.batch_size (e.g. to 16), with trainer.accumulate 2 to keep the effective batch" in message
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["stopped"].startswith("stopped: ")


@pytest.mark.slow
@pytest.mark.compiles
def test_compiled_model_trains_and_reports_compile_time_apart(tmp_path):
    """trainer.compile runs the step through torch.compile (inductor; on the CPU
    here); its first steps are counted as compilation, not training."""
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__compile="default", trainer__epochs=2))
    run = cnnreg.build(recipe, output=False)
    result = cnnreg.fit(run)
    assert result.compile_seconds > 1.0  # compiling a CNN takes seconds
    assert result.train_seconds < result.compile_seconds
    assert result.records[-1].metrics["val_accuracy"] > 0.34
    assert run.step_model is not run.model  # the step calls the compiled module ...
    assert cnnreg.evaluate(run, "test").metrics["accuracy"] > 0.34  # ... and evaluation works with it


class StepRecorder:
    """The model's weights at every optimizer step, from the cnnreg_optimizer_step event."""

    def __init__(self):
        self.steps: list[tuple[int, int, int]] = []
        self.weights: list[torch.Tensor] = []

    @hookimpl
    def cnnreg_optimizer_step(self, run, epoch, step, total_steps):
        self.steps.append((epoch, step, total_steps))
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in run.model.parameters()]))


def test_accumulation_steps_on_the_last_partial_group_too(tmp_path):
    """Five batches an epoch, two per step: two full groups and a last group of one, which must step."""
    recorder = StepRecorder()
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=2, trainer__accumulate=2,
                                            data__train_size=160, data__batch_size=32, scheduler={"name": "onecycle"}),
                                extra=[recorder])
    run = cnnreg.build(recipe, output=False)
    cnnreg.fit(run)
    assert recorder.steps == [(1, 1, 6), (1, 2, 6), (1, 3, 6), (2, 4, 6), (2, 5, 6), (2, 6, 6)]
    assert not torch.equal(recorder.weights[1], recorder.weights[2])  # the one-batch group moved the weights
    assert run.schedule.scheduler.last_epoch == 6  # and the per-step schedule counted it
