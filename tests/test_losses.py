"""The losses agree with torch's functional ones, and their options take effect."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cnnreg_plugins import losses
from cnnreg_plugins.losses import bce_with_logits, cross_entropy, nll


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2])
    return logits, targets


def test_the_plugin_registers_its_losses():
    assert losses.cnnreg_losses() == {"cross_entropy": cross_entropy, "nll": nll, "bce_with_logits": bce_with_logits,
                                      "focal": losses.focal}


def test_cross_entropy_is_torchs(batch):
    logits, targets = batch
    loss = cross_entropy(num_classes=4)(logits, targets)
    assert loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    expected = (-torch.log_softmax(logits, 1)[0, 0] - torch.log_softmax(logits, 1)[1, 1]) / 2
    torch.testing.assert_close(cross_entropy()(logits, targets), expected)


def test_label_smoothing_matches_torch_and_changes_the_loss(batch):
    logits, targets = batch
    smoothed = cross_entropy(label_smoothing=0.1)(logits, targets)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, targets, label_smoothing=0.1))
    assert not torch.allclose(smoothed, cross_entropy()(logits, targets))


def test_class_weights_match_torch_and_change_the_loss(batch):
    logits, targets = batch
    weight = [1.0, 2.0, 0.5, 3.0]
    weighted = cross_entropy(weight=weight, num_classes=4)(logits, targets)
    torch.testing.assert_close(weighted, F.cross_entropy(logits, targets, weight=torch.tensor(weight)))
    assert not torch.allclose(weighted, cross_entropy()(logits, targets))


def test_a_zero_class_weight_removes_that_class_from_the_loss(batch):
    logits, targets = batch
    keep = targets != 0
    loss = cross_entropy(weight=[0.0, 1.0, 1.0, 1.0])(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))


@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_a_weight_per_class_is_required(factory):
    with pytest.raises(ValueError, match="weight has 3 entries but the dataset has 4 classes"):
        factory(weight=[1.0, 1.0, 1.0], num_classes=4)


@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_weights_that_do_not_fit_the_models_output_are_a_clear_error(factory, batch):
    logits, targets = batch
    loss = factory(weight=[1.0, 1.0, 1.0])  # number of classes not known when built
    with pytest.raises(ValueError, match="the model gives 4 logits but weight has 3 entries"):
        loss(logits, targets)


@pytest.mark.parametrize(
    "weight, message",
    [
        ([-1.0, 1.0], r"^class weights must be finite and >= 0, not \[-1.0, 1.0\]$"),
        ([float("nan"), 1.0], r"^class weights must be finite and >= 0, not \[nan, 1.0\]$"),
        ([float("inf"), 1.0], r"^class weights must be finite and >= 0, not \[inf, 1.0\]$"),
        ([0.0, 0.0], r"^class weights are all zero: at least one class must count$"),
    ],
)
def test_bad_class_weights_are_refused_saying_what_is_wrong(weight, message):
    with pytest.raises(ValueError, match=message):
        cross_entropy(weight=weight, num_classes=2)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0])
def test_label_smoothing_must_be_a_share_below_one(smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(label_smoothing=smoothing)
    with pytest.raises(ValueError, match="label_smoothing"):
        bce_with_logits(label_smoothing=smoothing)


def test_nll_applies_log_softmax_to_the_logits_first(batch):
    logits, targets = batch
    torch.testing.assert_close(nll()(logits, targets), F.nll_loss(F.log_softmax(logits, 1), targets))
    torch.testing.assert_close(nll()(logits, targets), F.cross_entropy(logits, targets))


def test_nll_with_class_weights(batch):
    logits, targets = batch
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5])
    got = nll(weight=weight.tolist(), num_classes=4)(logits, targets)
    torch.testing.assert_close(got, F.nll_loss(F.log_softmax(logits, 1), targets, weight=weight))


def test_bce_is_one_vs_rest_over_one_hot_targets(batch):
    logits, targets = batch
    one_hot = F.one_hot(targets, 4).float()
    got = bce_with_logits(num_classes=4)(logits, targets)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, one_hot))
    by_hand = -(one_hot * F.logsigmoid(logits) + (1 - one_hot) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(got, by_hand)


def test_bce_for_a_two_class_dataset_has_a_logit_per_class():
    logits = torch.tensor([[3.0, -3.0], [-1.0, 2.0]])
    targets = torch.tensor([0, 1])
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(bce_with_logits(num_classes=2)(logits, targets), expected)


def test_bce_label_smoothing_and_weights(batch):
    logits, targets = batch
    s = 0.2
    soft = F.one_hot(targets, 4).float() * (1 - s) + s / 4
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = bce_with_logits(label_smoothing=s, weight=weight.tolist(), num_classes=4)(logits, targets)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, soft, weight=weight))


@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_half_precision_logits_are_scored_in_float32(factory, batch):
    logits, targets = batch
    loss = factory(weight=[1.0, 2.0, 1.0, 1.0])
    got = loss(logits.bfloat16(), targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(logits.bfloat16().float(), targets))


@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_gradients_flow_to_the_logits(factory, batch):
    logits, targets = batch
    logits = logits.clone().requires_grad_()
    factory()(logits, targets).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_class_weights_are_copied_to_a_device_once():
    weights = losses.ClassWeights.of([1.0, 2.0], num_classes=2)
    logits = torch.zeros(3, 2)
    first = weights.on(logits)
    assert weights.on(logits) is first
    assert weights.on(logits.double()) is not first
    assert weights.on(logits.double()).dtype == torch.float64


# torch's own weighted losses, the references for the weights the loss callables build themselves
TORCH_WEIGHTED = {
    cross_entropy: lambda logits, targets, w: F.cross_entropy(logits, targets, weight=w),
    nll: lambda logits, targets, w: F.nll_loss(F.log_softmax(logits, 1), targets, weight=w),
    bce_with_logits: lambda logits, targets, w: F.binary_cross_entropy_with_logits(
        logits, F.one_hot(targets, logits.shape[1]).to(logits.dtype), weight=w
    ),
}


@pytest.mark.parametrize("factory", TORCH_WEIGHTED, ids=lambda f: f.__name__)
def test_inside_a_compiled_graph_the_weights_are_the_users_in_the_logits_dtype(factory, batch, monkeypatch):
    # A graph builds its weights apart from the eager cache. torch.compile cannot run under
    # mutation testing (the compiled test below is left out), so take that branch by telling the
    # loss it is being compiled; float64 logits show whether the weights follow their dtype.
    logits, targets = batch
    logits = logits.double()
    weight = [1.0, 2.0, 0.5, 3.0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = factory(weight=weight, num_classes=4)(logits, targets)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, TORCH_WEIGHTED[factory](logits, targets, torch.tensor(weight, dtype=torch.float64)))


@pytest.mark.parametrize("factory", TORCH_WEIGHTED, ids=lambda f: f.__name__)
def test_a_loss_step_warns_of_nothing(factory, batch):
    # The loss runs every step: any warning it raised (torch's deprecated implicit softmax
    # dimension, say) would fill a user's training log.
    logits, targets = batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factory()(logits, targets)
        factory(weight=[1.0, 2.0, 0.5, 3.0], num_classes=4)(logits, targets)


@pytest.mark.compiles
@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_a_weighted_loss_compiles_in_one_graph_without_recompiling(factory, batch):
    logits, targets = batch
    expected = factory(weight=[1.0, 2.0, 0.5, 1.0], num_classes=4)(logits, targets)
    loss = factory(weight=[1.0, 2.0, 0.5, 1.0], num_classes=4)  # compiled before any eager call
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            torch.testing.assert_close(compiled(logits, targets), expected)
            loss(logits, targets)  # eager calls filling the cache must not matter to the graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize("factory", [cross_entropy, nll, bce_with_logits], ids=lambda f: f.__name__)
def test_on_cuda_a_weighted_loss_step_never_waits_for_the_gpu(factory):
    loss = factory(weight=[1.0, 2.0, 0.5, 1.0], num_classes=4)
    logits = torch.randn(32, 4, device="cuda", requires_grad=True)
    targets = torch.randint(0, 4, (32,), device="cuda")
    loss(logits, targets)  # the first call copies the weights to the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                value = loss(logits, targets)
            value.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = factory(weight=[1.0, 2.0, 0.5, 1.0])(logits.detach().cpu(), targets.cpu())
    torch.testing.assert_close(value.detach().cpu(), cpu, rtol=1e-4, atol=1e-5)
