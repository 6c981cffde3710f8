"""The muon optimizer: torch's Muon plus AdamW or SGD, stepping and resuming as the two would."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import cnnreg
from cnnreg.core.errors import UserError
from cnnreg_plugins.optim import muon

from conftest import tiny_recipe


def small_cnn() -> nn.Module:
    """A conv filter (4-D), a norm, a hidden matrix and a head: every kind the split sees."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def backward(model: nn.Module, seed: int) -> None:
    x, y = batch(seed)
    nn.functional.cross_entropy(model(x), y).backward()


class Reference:
    """torch.optim.Muon on the conv filter (as its [out, in*kh*kw] matrix) and the hidden matrix,
    torch.optim.AdamW on the rest, each made and stepped by hand."""

    def __init__(self, model: nn.Module, lr: float = 0.02, others=None):
        conv, hidden = model[0], model[4]
        self.conv = conv
        self.filter = nn.Parameter(conv.weight.detach().reshape(4, -1).clone())
        self.muon = torch.optim.Muon([self.filter, hidden.weight], lr=lr, momentum=0.95, nesterov=True,
                                     weight_decay=0.01)
        rest = [p for p in model.parameters() if p is not conv.weight and p is not hidden.weight]
        others = others or (lambda params: torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01))
        self.adamw = others(rest)

    def step(self) -> None:
        self.filter.grad = self.conv.weight.grad.reshape(4, -1).clone()
        self.muon.step()
        self.adamw.step()
        with torch.no_grad():
            self.conv.weight.copy_(self.filter.reshape(self.conv.weight.shape))
        for optimizer in (self.muon, self.adamw):
            optimizer.zero_grad(set_to_none=True)
        self.conv.weight.grad = None


def make(model: nn.Module, **options) -> torch.optim.Optimizer:
    return muon([{"params": list(model.parameters())}], **options)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_it_splits_filters_and_matrices_from_biases_norms_and_the_head():
    model = small_cnn()
    optimizer = make(model)
    others, muons = optimizer.param_groups
    assert {id(p) for p in muons["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert len(others["params"]) == 6  # conv bias, norm weight and bias, hidden bias, head weight and bias
    assert muons["lr"] == 0.02 and others["lr"] == 3e-4
    assert isinstance(optimizer, torch.optim.Optimizer)


def test_the_head_goes_to_muon_when_asked():
    model = small_cnn()
    _, muons = make(model, head="muon").param_groups
    assert any(p is model[6].weight for p in muons["params"])


def test_a_step_equals_stepping_torch_muon_and_adamw_apart():
    model, twin = small_cnn(), small_cnn()
    optimizer, reference = make(model), Reference(twin)
    for seed in range(4):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backward(twin, seed)
        reference.step()
    assert not torch.equal(model[0].weight, small_cnn()[0].weight)  # it moved
    assert_same(model, twin)


def test_sgd_for_the_rest():
    model, twin = small_cnn(), small_cnn()
    optimizer = make(model, others="sgd", others_lr=0.05, others_momentum=0.8, others_nesterov=True,
                     others_weight_decay=5e-4)
    reference = Reference(twin, others=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.8, nesterov=True,
                                                                      weight_decay=5e-4))
    for seed in range(3):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad()
        backward(twin, seed)
        reference.step()
    assert_same(model, twin)


def test_a_schedule_changes_both_rates():
    model, twin = small_cnn(), small_cnn()
    optimizer = make(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    reference = Reference(twin)
    for seed in range(3):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        backward(twin, seed)
        reference.step()
        for inner in (reference.muon, reference.adamw):  # StepLR by hand: a tenth each step
            for group in inner.param_groups:
                group["lr"] = group["lr"] * 0.1
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-7, 2e-5])
    assert_same(model, twin)


def checkpointed(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_resumed_optimizer_takes_identical_steps():
    straight = small_cnn()
    optimizer = make(straight)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    saved = None
    for seed in range(5):
        if seed == 3:
            saved = checkpointed({"model": straight.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict()})
        backward(straight, seed)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    resumed = small_cnn()
    resumed.load_state_dict(saved["model"])
    optimizer = make(resumed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert len(optimizer.muon.state) == 2  # the momenta came back
    for seed in range(3, 5):
        backward(resumed, seed)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert_same(straight, resumed)


def test_channels_last_filters_step_as_contiguous_ones():
    model, twin = small_cnn(), small_cnn()
    model.to(memory_format=torch.channels_last)
    twin.to(memory_format=torch.channels_last)  # the same forward pass; the reference flattens by copy
    optimizer, reference = make(model), Reference(twin)
    for seed in range(2):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad()
        backward(twin, seed)
        reference.step()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(model, twin)


def test_without_torch_muon_it_names_the_torch_needed(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"torch 2\.9 or later"):
        make(small_cnn())


def test_a_model_without_hidden_weights_is_a_clear_error():
    with pytest.raises(UserError, match="use adamw or sgd"):
        make(nn.Sequential(nn.Linear(4, 3)))


def test_a_recipe_with_muon_trains(tmp_path):
    recipe = cnnreg.load_recipe(tiny_recipe(tmp_path, trainer__epochs=4, optimizer={"name": "muon"},
                                            scheduler={"name": "cosine"}))
    run = cnnreg.build(recipe, output=False)
    result = cnnreg.fit(run)
    first, last = result.records[0].metrics, result.records[-1].metrics
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["val_accuracy"] > 0.5
