"""Stochastic weight averaging (the ``swa`` callback), checked against torch.optim.swa_utils run by hand:
the average of the end-of-epoch weights, batch-norm statistics recomputed for it, SWALR's rates,
an exact resume, and its parameter errors."""

from __future__ import annotations

import copy
import math
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import cnnreg
from cnnreg.core import stops
from cnnreg.core.errors import RecipeError
from cnnreg.inputs.prepare import prepare_batch
from cnnreg.plugin.hookspecs import hookimpl
from cnnreg_plugins.swa import swa

from conftest import tiny_recipe

BN_MODEL = {"name": "simple_cnn", "widths": [8, 8, 8], "batch_norm": True}


class Weights:
    """Records the training weights after each epoch's last optimizer step, and what the
    model holds once every plugin has handled the epoch's end (what validation saw)."""

    def __init__(self):
        self.trained: dict[int, dict[str, torch.Tensor]] = {}
        self.at_epoch_end: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def cnnreg_optimizer_step(self, run, epoch, step, total_steps):
        if step % (total_steps // run.recipe.trainer.epochs) == 0:
            self.trained[epoch] = copy.deepcopy(run.model.state_dict())

    @hookimpl(trylast=True)
    def cnnreg_epoch_end(self, run, record):
        self.at_epoch_end[record.epoch] = copy.deepcopy(run.model.state_dict())


class InterruptAfterEpoch:
    def __init__(self, epoch):
        self.epoch = epoch

    @hookimpl
    def cnnreg_epoch_end(self, run, record):
        if record.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def test_the_model_ends_with_the_average_of_the_end_of_epoch_weights_and_bn_statistics_recomputed(tmp_path):
    # deterministic train transforms, so the reference below sees the very batches update_bn saw
    recipe = tiny_recipe(tmp_path, trainer__epochs=4, model=BN_MODEL,
                         transforms={"train": [{"name": "normalize"}], "eval": [{"name": "normalize"}]},
                         callbacks=[{"name": "swa", "start_epoch": 2}])
    weights = Weights()
    run = cnnreg.build(cnnreg.load_recipe(recipe, extra=[weights]), output=False)
    result = cnnreg.fit(run)
    model = run.model

    # (a) torch's AveragedModel, fed by hand with the training weights of epochs 2, 3 and 4
    net = copy.deepcopy(model)
    reference = AveragedModel(net)
    for epoch in (2, 3, 4):
        net.load_state_dict(weights.trained[epoch])
        reference.update_parameters(net)
        if epoch < 4:  # validation from the start epoch on saw the average so far
            for name, param in reference.module.named_parameters():
                assert torch.equal(weights.at_epoch_end[epoch][name], param), (epoch, name)
    assert set(weights.at_epoch_end[1]) and all(torch.equal(weights.at_epoch_end[1][k], v)
                                               for k, v in weights.trained[1].items())  # before SWA: untouched
    for name, param in reference.module.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param), name
        mean = torch.stack([weights.trained[e][name] for e in (2, 3, 4)]).mean(0)
        torch.testing.assert_close(param, mean, rtol=0, atol=1e-6)

    # (b) torch's update_bn on that average, over one pass of the training batches
    batches = run.batches["train"]
    batches.set_epoch(4)
    loader = [prepare_batch(images, run.train_transforms, channels_last=False, index=index, epoch=4)
              for images, _, index in batches.indexed()]
    expected = copy.deepcopy(reference.module)
    update_bn(loader, expected)
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    buffers, trained = dict(model.named_buffers()), weights.trained[4]
    for name in norms:
        for stat in ("running_mean", "running_var"):
            want = dict(expected.named_buffers())[f"{name}.{stat}"]
            torch.testing.assert_close(buffers[f"{name}.{stat}"], want, rtol=1e-6, atol=1e-7)
            assert not torch.allclose(trained[f"{name}.{stat}"], want)  # not the training statistics
    # the last validation was of this final model
    assert cnnreg.evaluate(run, "val").metrics["loss"] == pytest.approx(result.records[-1].metrics["val_loss"])


def swalr_rates(lr0: float, swa_lr: float, anneal_epochs: int, strategy: str, epochs: int) -> list[float]:
    """The rate of each epoch under torch's SWALR, created at the first SWA epoch and stepped after each."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        rates = []
        for _ in range(epochs):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return rates


@pytest.mark.parametrize("scheduler, strategy, anneal_epochs", [
    ({"name": "step", "step_size": 1, "gamma": 0.5}, "cos", 3),  # 3 epochs: cos and linear differ at 1/3, 2/3
    ({"name": "cosine", "interval": "step"}, "linear", 3),
    ({"name": "step", "step_size": 1, "gamma": 0.5}, "cos", 0),
])
def test_swa_lr_takes_over_from_the_recipes_schedule_with_swalrs_rates(tmp_path, scheduler, strategy, anneal_epochs):
    recipe = tiny_recipe(tmp_path, trainer__epochs=5, scheduler=scheduler, data__train_size=96,
                         callbacks=[{"name": "swa", "start_epoch": 2, "swa_lr": 0.002, "anneal_epochs": anneal_epochs,
                                     "anneal_strategy": strategy, "update_bn": False}])
    run = cnnreg.build(cnnreg.load_recipe(recipe), output=False)
    used: list[float] = []  # the rate of every optimizer step, as the optimizer sees it
    run.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    result = cnnreg.fit(run)
    per_epoch = len(run.batches["train"])
    by_epoch = [used[i * per_epoch:(i + 1) * per_epoch] for i in range(5)]
    if scheduler["name"] == "step":
        assert by_epoch[0] == [0.01] * per_epoch  # before SWA: the recipe's schedule
        lr0 = 0.01 * 0.5
    else:  # torch's CosineAnnealingLR per step, T_max the whole run, after 1 epoch
        assert by_epoch[0][0] == 0.01 and by_epoch[0][-1] < 0.01
        lr0 = 0.01 * (1 + math.cos(math.pi * 1 / 5)) / 2
    expected = swalr_rates(lr0, 0.002, anneal_epochs, strategy, 4)
    assert len(set(expected)) == (4 if anneal_epochs else 1)
    for k, epoch in enumerate((2, 3, 4, 5)):
        assert by_epoch[epoch - 1] == pytest.approx([expected[k]] * per_epoch, rel=1e-9), epoch
        assert result.records[epoch - 1].metrics["lr"] == pytest.approx(expected[k], rel=1e-9)
    assert expected[-1] == pytest.approx(0.002)


def test_a_run_interrupted_after_an_swa_epoch_resumes_to_the_same_weights(tmp_path):
    changes = dict(trainer__epochs=4, trainer__deterministic=True, model=BN_MODEL,  # random flips: random streams
                   callbacks=[{"name": "swa", "start_epoch": 2, "swa_lr": 0.005, "anneal_epochs": 3},
                              {"name": "checkpoint"}])
    straight = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "a", **changes)))
    cnnreg.fit(straight)

    interrupted = cnnreg.build(cnnreg.load_recipe(tiny_recipe(tmp_path / "b", **changes),
                                                  extra=[InterruptAfterEpoch(3)]))
    with pytest.raises(stops.Interrupted):
        cnnreg.fit(interrupted)
    resumed = cnnreg.build(cnnreg.load_recipe(interrupted.run_dir / "recipe.json"), run_dir=interrupted.run_dir)
    cnnreg.fit(resumed, resume=True)
    assert int(resumed.callbacks[0].averaged.n_averaged) == 3
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # last.pt holds the final model, and both runs kept the same best weights
    for run in (straight, resumed):
        saved = torch.load(run.run_dir / "last.pt", weights_only=True)["model"]
        for key, value in run.model.state_dict().items():
            assert torch.equal(saved[key], value), key
    best = [load_file(run.run_dir / "best.safetensors") for run in (straight, resumed)]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])


@pytest.mark.parametrize("params, message", [
    ({"swa_lr": 0.0}, "swa_lr must be > 0"),
    ({"swa_lr": -0.1}, "swa_lr must be > 0"),
    ({"anneal_epochs": -1}, "anneal_epochs must be >= 0"),
    ({"start_epoch": 0}, "start_epoch must be an epoch number"),
    ({"start_epoch": 2.5}, "start_epoch must be an epoch number"),
])
def test_bad_parameters_say_what_is_wrong(tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        swa(epochs=10, **params)
    recipe = tiny_recipe(tmp_path, callbacks=[{"name": "swa", **params}])
    with pytest.raises(RecipeError, match=message):
        cnnreg.build(cnnreg.load_recipe(recipe), output=False)


def test_a_start_epoch_beyond_the_run_is_a_recipe_error_that_validate_finds_too(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=2, callbacks=[{"name": "swa", "start_epoch": 3}]))
    message = r"callbacks\[0\].*start_epoch 3 is beyond the run's 2 epochs.*at most 2"
    with pytest.raises(RecipeError, match=message):
        cnnreg.validate(recipe.to_json())
    with pytest.raises(RecipeError, match=message):
        cnnreg.build(recipe, output=False)


def test_a_fraction_starts_as_lightning_and_without_eval_with_average_validation_sees_the_training_weights(tmp_path):
    # Lightning: swa_epoch_start=f starts at 0-based epoch int(f * max_epochs); 0.5 of 4 -> the 3rd epoch
    recipe = tiny_recipe(tmp_path, trainer__epochs=4, data__train_size=96,
                         callbacks=[{"name": "swa", "start_epoch": 0.5, "eval_with_average": False}])
    weights = Weights()
    run = cnnreg.build(cnnreg.load_recipe(recipe, extra=[weights]), output=False)
    cnnreg.fit(run)
    for epoch in (1, 2, 3, 4):
        assert all(torch.equal(weights.at_epoch_end[epoch][k], v) for k, v in weights.trained[epoch].items()), epoch
    for name, param in run.model.named_parameters():
        mean = torch.stack([weights.trained[e][name] for e in (3, 4)]).mean(0)
        torch.testing.assert_close(param.detach(), mean, rtol=0, atol=1e-6)
