"""The resumable training state (cnnreg.engine.training_state): what last.pt holds, and refusing one that does not fit.

Whole interrupted-and-resumed runs are in test_engine.py; here a state is
saved from one run and restored into a second run built from the same
recipe, piece by piece, and compared with what the first run held.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import cnnreg
from cnnreg.core import checkpoint
from cnnreg.core.distributed import DistInfo
from cnnreg.core.errors import UserError
from cnnreg.core.records import EpochRecord, EvalResult
from cnnreg.engine.tallies import Tallies
from cnnreg.engine.training_state import (check_state_fits, record_from_json, record_to_json, restore_training_state,
                                          save_training_state, training_state)

from conftest import tiny_recipe


def tiny_run(tmp_path, name="a", output=True, **changes):
    recipe = tiny_recipe(tmp_path / name, model={"name": "simple_cnn", "widths": [4, 4, 4]},
                         scheduler={"name": "onecycle"}, **changes)
    return cnnreg.build(cnnreg.load_recipe(recipe), output=output)


class Counter:
    """A callback with state, as early stopping keeps its patience."""

    def __init__(self, count=0):
        self.count, self.loaded = count, []

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.loaded.append(state)
        self.count = state["count"]


class Stateless:
    pass


def trained(run, steps=2):
    """A few real Adam and scheduler steps, so every part of the state differs from a fresh run's."""
    images = run.data.train.images[:6].float() / 255
    for _ in range(steps):
        run.model(images).square().mean().backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        run.schedule.scheduler.step()
    return run


def some_tallies(run):
    tallies = Tallies(run.data.num_classes, run.metrics, run.device)
    tallies.update(torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]), torch.tensor([0, 2]), torch.tensor(0.75))
    return tallies


def a_record(epoch):
    val = EvalResult(split="val", metrics={"loss": 0.5 + epoch, "accuracy": 0.25},
                     per_class={"support": (3.0, 1.0, 0.0), "recall": (0.5, 1.0, 0.0)},
                     confusion=((2, 1, 0), (0, 1, 0), (0, 0, 0)), classes=("a", "b", "c"))
    return EpochRecord(epoch=epoch, epochs=5, metrics={"train_loss": 1.5, "val_loss": 0.5 + epoch, "lr": 0.01},
                       evals={"val": val}, train_seconds=1.25 * epoch, seconds=2.5 * epoch, images_per_second=99.5)


def test_a_saved_state_restores_a_second_run_exactly_where_the_first_was(tmp_path):
    first = trained(tiny_run(tmp_path, "a"))
    first = replace(first, callbacks=(Counter(7), Stateless(), Counter(3)))
    tallies, history = some_tallies(first), [a_record(1), a_record(2)]
    path = save_training_state(first, 2, 3, tallies, history, loss_reference=1.75)
    assert path == first.run_dir / "last.pt" and path.is_file()
    # what would have come next from every generator at the save
    upcoming = (torch.rand(4), np.random.rand(3), random.random())

    second = tiny_run(tmp_path, "b")
    second = replace(second, callbacks=(Counter(), Stateless(), Counter()))
    start, skip, partial, restored = restore_training_state(second, checkpoint.load_state(path))
    assert (start, skip) == (3, 3)  # epoch 3, from its fourth batch
    assert restored == history
    assert set(partial) == set(tallies.state())
    assert all(torch.equal(partial[k], v) for k, v in tallies.state().items() if isinstance(v, torch.Tensor))
    assert len(partial["extra"]) == len(first.metrics)
    ours, theirs = second.model.state_dict(), first.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert str(second.optimizer.state_dict()) == str(first.optimizer.state_dict())
    assert second.schedule.scheduler.state_dict() == first.schedule.scheduler.state_dict()
    assert [getattr(cb, "count", None) for cb in second.callbacks] == [7, None, 3]
    next_draws = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(next_draws[0], upcoming[0]) and np.array_equal(next_draws[1], upcoming[1])
    assert next_draws[2] == upcoming[2]
    assert checkpoint.load_state(path)["loss_reference"] == 1.75


def test_an_end_of_epoch_state_resumes_at_the_next_epochs_first_batch_without_tallies(tmp_path):
    run = trained(tiny_run(tmp_path))
    path = save_training_state(run, 2, tallies=some_tallies(run))
    start, skip, partial, history = restore_training_state(tiny_run(tmp_path, "b"), checkpoint.load_state(path))
    assert (start, skip, partial, history) == (3, 0, None, [])
    assert training_state(run, 2)["step_in_epoch"] == 0


def test_a_mid_epoch_state_without_tallies_holds_none(tmp_path):
    run = tiny_run(tmp_path, output=False)
    assert training_state(run, 1, 3)["partial"] is None
    assert training_state(run, 1, 3, some_tallies(run))["partial"] is not None


def test_only_rank_0_of_a_run_with_a_directory_writes_last_pt(tmp_path):
    assert save_training_state(tiny_run(tmp_path, "a", output=False), 1) is None
    run = tiny_run(tmp_path, "b")
    other_rank = replace(run, dist=DistInfo(rank=1, world_size=2))
    assert save_training_state(other_rank, 1) is None
    assert not (run.run_dir / "last.pt").exists()
    assert save_training_state(run, 1) == run.run_dir / "last.pt"


def test_a_state_from_a_run_without_schedule_or_scaler_holds_none_for_them(tmp_path):
    recipe = tiny_recipe(tmp_path, model={"name": "simple_cnn", "widths": [4, 4, 4]})
    run = cnnreg.build(cnnreg.load_recipe(recipe), output=False)
    state = training_state(run, 1)
    assert state["scheduler"] is None and state["scaler"] is None
    assert state["world_size"] == 1 and state["format"] == 1


def test_a_schedule_added_or_removed_in_the_recipe_does_not_stop_a_resume(tmp_path):
    with_schedule = trained(tiny_run(tmp_path, "a"))
    state = training_state(with_schedule, 1)
    recipe = tiny_recipe(tmp_path / "b", model={"name": "simple_cnn", "widths": [4, 4, 4]})
    without = cnnreg.build(cnnreg.load_recipe(recipe))
    assert restore_training_state(without, state)[0] == 2
    fresh = tiny_run(tmp_path, "c")
    before = fresh.schedule.scheduler.state_dict()
    restore_training_state(fresh, training_state(without, 1))  # saved without a schedule: it starts afresh
    assert fresh.schedule.scheduler.state_dict() == before


def scaler(scale):
    return torch.amp.GradScaler("cpu", init_scale=scale)


def test_the_gradient_scalers_scale_is_restored(tmp_path):
    saved = training_state(replace(tiny_run(tmp_path, "a"), scaler=scaler(4.0)), 1)
    run = replace(tiny_run(tmp_path, "b"), scaler=scaler(65536.0))
    restore_training_state(run, saved)
    assert run.scaler.get_scale() == 4.0
    # a state of an fp32 run leaves a scaler as it starts; a run without one ignores a saved scale
    fresh = replace(tiny_run(tmp_path, "c"), scaler=scaler(1024.0))
    restore_training_state(fresh, training_state(tiny_run(tmp_path, "d"), 1))
    assert fresh.scaler.get_scale() == 1024.0
    assert restore_training_state(tiny_run(tmp_path, "e"), saved)[0] == 2


def test_a_callback_gets_only_state_it_saved(tmp_path):
    # the recipe now has a stateful callback where a stateless one saved None, and one that cannot load state
    state = training_state(replace(tiny_run(tmp_path, "a"), callbacks=(Stateless(), Counter(5))), 1)
    assert state["callbacks"] == [None, {"count": 5}]
    now = (Counter(1), Stateless())
    restore_training_state(replace(tiny_run(tmp_path, "b"), callbacks=now), state)
    assert now[0].loaded == [] and now[0].count == 1


def test_a_mid_epoch_state_resumes_only_with_the_number_of_processes_that_saved_it(tmp_path):
    two = replace(tiny_run(tmp_path, "a"), dist=DistInfo(rank=0, world_size=2))
    run = tiny_run(tmp_path, "b")
    with pytest.raises(UserError) as info:
        restore_training_state(run, training_state(two, 1, 5, some_tallies(two)))
    assert str(info.value) == ("this checkpoint was saved mid-epoch by 2 process(es); resume it with 2 (now 1), "
                               "or from an end-of-epoch checkpoint")
    assert restore_training_state(run, training_state(two, 1))[:2] == (2, 0)  # an epoch's end: any number


def test_on_other_ranks_the_partial_tallies_are_not_loaded_again(tmp_path):
    # rank 0's tallies are summed over the ranks at the epoch's end: each rank but 0 starts from zero
    two = replace(tiny_run(tmp_path, "a"), dist=DistInfo(rank=0, world_size=2))
    state = training_state(two, 1, 5, some_tallies(two))
    rank1 = replace(tiny_run(tmp_path, "b"), dist=DistInfo(rank=1, world_size=2))
    assert restore_training_state(rank1, state)[:3] == (2, 5, None)
    rank0 = replace(tiny_run(tmp_path, "c"), dist=DistInfo(rank=0, world_size=2))
    assert restore_training_state(rank0, state)[2] is not None


# --- a state that does not fit ----------------------------------------------------------------------------------

def refusal(run, state):
    with pytest.raises(UserError) as info:
        check_state_fits(run, state)
    return str(info.value)


def another_recipe(run, differences):
    return (f"{run.run_dir / 'last.pt'} was saved by another recipe than {run.run_dir / 'recipe.json'} now gives: "
            f"{differences}. Nothing was changed: undo the edit to resume, or start a new run with the new recipe")


def test_a_state_fits_the_run_that_saved_it(tmp_path):
    run = trained(tiny_run(tmp_path))
    check_state_fits(run, training_state(run, 1))


def test_a_state_of_another_format_is_refused_with_both_formats(tmp_path):
    run = tiny_run(tmp_path)
    state = {**training_state(run, 1), "format": 2}
    assert refusal(run, state) == "checkpoint format 2 is not one this cnnreg reads (1)"


def edited(state, drop=0, extra=(), reshape=()):
    model = dict(state["model"])
    for key in list(model)[:drop]:
        del model[key]
    for key in extra:
        model[key] = torch.zeros(2)
    for key, shape in reshape:
        model[key] = torch.zeros(shape)
    return {**state, "model": model}


def test_another_model_is_refused_with_the_tensors_that_differ(tmp_path):
    run = tiny_run(tmp_path)
    keys = list(run.model.state_dict())
    state = edited(training_state(run, 1), drop=4, extra=["head.weight"], reshape=[(keys[4], (4, 4, 5, 5))])
    assert refusal(run, state) == another_recipe(run, (
        f"4 tensors in the model but not in last.pt: {keys[0]}, {keys[1]}, {keys[2]} and 1 more; "
        "1 tensor in last.pt but not in the model: head.weight; "
        f"1 tensor of another shape: {keys[4]} [4, 4, 5, 5] in last.pt, {list(run.model.state_dict()[keys[4]].shape)} now"))


def test_three_differences_are_all_named_and_two_are_plural(tmp_path):
    run = tiny_run(tmp_path)
    keys = list(run.model.state_dict())
    state = edited(training_state(run, 1), drop=3, extra=["x.a", "x.b"])
    assert refusal(run, state) == another_recipe(run, (
        f"3 tensors in the model but not in last.pt: {keys[0]}, {keys[1]}, {keys[2]}; "
        "2 tensors in last.pt but not in the model: x.a, x.b"))


def test_a_model_difference_is_said_once_not_again_as_the_optimizers(tmp_path):
    run = tiny_run(tmp_path)
    keys = list(run.model.state_dict())
    state = edited(training_state(run, 1), drop=1)
    groups = state["optimizer"]["param_groups"]
    for optimizer in ({**state["optimizer"], "param_groups": groups * 2},
                      {**state["optimizer"], "param_groups": [{**groups[0], "params": groups[0]["params"][1:]}]}):
        assert refusal(run, {**state, "optimizer": optimizer}) == another_recipe(
            run, f"1 tensor in the model but not in last.pt: {keys[0]}")


def test_another_optimizer_layout_is_refused(tmp_path):
    run = tiny_run(tmp_path)
    state = training_state(run, 1)
    groups = state["optimizer"]["param_groups"]
    two_groups = {**state, "optimizer": {**state["optimizer"], "param_groups": groups * 2}}
    assert refusal(run, two_groups) == another_recipe(run, "the optimizer has 1 parameter groups, last.pt 2")
    fewer = {**state, "optimizer": {**state["optimizer"],
                                    "param_groups": [{**groups[0], "params": groups[0]["params"][:-1]}]}}
    assert refusal(run, fewer) == another_recipe(
        run, "the optimizer's parameter groups hold other parameters than last.pt's")
    no_optimizer = {k: v for k, v in state.items() if k != "optimizer"}
    assert refusal(run, no_optimizer) == another_recipe(run, "the optimizer has 1 parameter groups, last.pt 0")


def test_an_epoch_record_comes_back_from_plain_data_as_it_was():
    record = a_record(3)
    data = record_to_json(record)
    assert json.loads(json.dumps(data)) == data  # plain data: torch.load(weights_only=True) reads it
    assert record_from_json(data) == record
