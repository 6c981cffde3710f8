"""Transfer learning with timm and torchvision backbones: weights really
load, heads fit the dataset, freezing holds, errors say what to do.

Everything runs on the CPU without a network: weights files are written by
the tests from seeded models (timm's tiny ``test_resnet`` and torchvision's
resnet18), and the hub and torch's download cache point into tmp_path.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models

from cnnreg.core.errors import UserError
from cnnreg.plugin.catalog import Family
from cnnreg_plugins.transfer import TransferModel, cnnreg_models, timm_model, torchvision_model

ARCH = "test_resnet"  # timm's own tiny ResNet: five stages, BatchNorm, 0.5M parameters


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The network the weights files come from."""
    torch.manual_seed(0)
    return timm.create_model(ARCH).eval()


@pytest.fixture
def weights(source: nn.Module, tmp_path: Path) -> Path:
    return _save(source.state_dict(), tmp_path / "test_resnet.safetensors")


def _batch(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def _trainable(model: TransferModel) -> set[str]:
    return {name for name, p in model.net.named_parameters() if p.requires_grad}


# -- timm: loading ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_file_is_loaded_and_head_sized_to_classes(source, tmp_path, suffix):
    path = _save(source.state_dict(), tmp_path / f"weights{suffix}")
    model = timm_model(ARCH, pretrained=path, num_classes=5).eval()
    torch.manual_seed(123)
    random = timm_model(ARCH, num_classes=5).eval()
    x = _batch()
    with torch.no_grad():
        expected = source.forward_features(x)
        assert torch.allclose(model.net.forward_features(x), expected, atol=1e-6)
        assert not torch.allclose(random.net.forward_features(x), expected, atol=1e-3)
        assert model(x).shape == (2, 5)
    assert model.net.get_classifier().out_features == 5


def test_timm_keeps_pretrained_head_when_class_count_matches(source, weights):
    model = timm_model(ARCH, pretrained=str(weights), num_classes=1000).eval()
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(model(x), source(x), atol=1e-5)


def test_timm_file_without_classifier_loads_backbone(source, tmp_path):
    torch.manual_seed(0)
    headless = timm.create_model(ARCH, num_classes=0)
    path = _save(headless.state_dict(), tmp_path / "headless.safetensors")
    model = timm_model(ARCH, pretrained=path, num_classes=4).eval()
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(model.net.forward_features(x), headless.eval().forward_features(x), atol=1e-6)
        assert model(x).shape == (2, 4)


def test_timm_grayscale_sums_pretrained_first_filters(source, weights):
    model = timm_model(ARCH, pretrained=weights, num_classes=3, in_channels=1).eval()
    first = model.net.get_submodule(source.pretrained_cfg["first_conv"])
    expected = source.get_submodule(source.pretrained_cfg["first_conv"]).weight.sum(dim=1, keepdim=True)
    assert torch.allclose(first.weight, expected)
    with torch.no_grad():
        assert model(_batch(channels=1)).shape == (2, 3)
    assert len(model.cnnreg_data_config["mean"]) == 1


def test_timm_mismatched_file_lists_missing_unexpected_and_shapes(source, tmp_path):
    state = dict(source.state_dict())
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["conv1.0.weight"] = torch.zeros(24, 3, 5, 5)
    path = _save(state, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as error:
        timm_model(ARCH, pretrained=path, num_classes=5)
    message = str(error.value)
    assert "1 key missing" in message and "layer1.0.conv1.weight" in message
    assert "1 key unexpected" in message and "extra.weight" in message
    assert "1 key of another shape" in message and "conv1.0.weight (24, 3, 5, 5) in the file" in message
    assert str(path) in message


def test_timm_file_missing_a_layer_is_refused_even_with_a_new_head(source, tmp_path):
    # timm itself loads non-strictly when it drops a classifier of another
    # size, which would leave this layer silently random
    state = dict(source.state_dict())
    del state["layer3.0.conv2.weight"]
    path = _save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="1 key missing.*layer3.0.conv2.weight"):
        timm_model(ARCH, pretrained=path, num_classes=5)


def test_timm_weights_of_another_architecture_are_refused_with_counts(weights):
    with pytest.raises(UserError) as error:
        timm_model("test_efficientnet", pretrained=weights, num_classes=5)
    message = str(error.value)
    assert "does not fit timm model 'test_efficientnet'" in message
    assert "keys missing" in message and "keys unexpected" in message and "more" in message


def test_timm_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(UserError, match="not found") as error:
        timm_model(ARCH, pretrained=path)
    assert str(path) in str(error.value)


def test_timm_unknown_arch_suggests_close_names():
    with pytest.raises(UserError, match="unknown timm architecture 'test_resnt'.*'test_resnet'"):
        timm_model("test_resnt")


def test_timm_unknown_pretrained_tag_lists_tags():
    with pytest.raises(UserError, match="test_resnet.r160_in1k"):
        timm_model("test_resnet.nope")


def test_timm_pretrained_offline_says_no_network_and_how_to_use_a_file(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import, into this
    # constant, and checks the constant on every request: setting the
    # environment variable now would change nothing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError) as error:
        timm_model(ARCH, pretrained=True, num_classes=5)
    message = str(error.value)
    assert f"timm model '{ARCH}'" in message
    assert "no network was reached" in message
    assert '"pretrained": "path/to/model.safetensors"' in message


def test_timm_drop_rates_reach_the_model():
    model = timm_model(ARCH, num_classes=2, drop_rate=0.2, drop_path_rate=0.1)
    assert model.net.drop_rate == 0.2
    assert any(getattr(m, "drop_prob", 0) == pytest.approx(0.1) for m in model.net.modules())


def test_timm_option_the_architecture_lacks_is_named():
    # timm's inception_v3 has no stochastic depth; it refuses before allocating anything
    with pytest.raises(UserError, match="'inception_v3' does not take drop_path_rate"):
        timm_model("inception_v3", drop_path_rate=0.1)


def test_timm_data_config_comes_from_pretrained_cfg(weights):
    config = timm_model(ARCH, num_classes=2).cnnreg_data_config
    assert config == {"input_size": (160, 160), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                      "interpolation": "bilinear", "crop_pct": 0.95, "pretrained": False}
    assert timm_model(ARCH, pretrained=weights, num_classes=2).cnnreg_data_config["pretrained"] is True


# -- freezing ----------------------------------------------------------------------


def _sgd(model: TransferModel, lr: float = 0.5) -> torch.optim.Optimizer:
    groups = model.cnnreg_param_groups()
    return torch.optim.SGD([{"params": g["params"], "lr": lr * g["lr_mult"]} for g in groups])


def _train_step(model: TransferModel, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(_batch()), torch.tensor([0, 1])).backward()
    optimizer.step()


def test_frozen_backbone_stays_put_while_head_trains(weights):
    model = timm_model(ARCH, pretrained=weights, num_classes=2, freeze="backbone")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    _train_step(model, _sgd(model))
    after = model.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # no weight, and no BatchNorm running statistic, moved


def test_unfrozen_batchnorm_statistics_do_move(weights):
    # the counterpart of the test above: without freezing, a step moves them
    model = timm_model(ARCH, pretrained=weights, num_classes=2)
    mean = model.net.bn1.running_mean.clone()
    _train_step(model, _sgd(model))
    assert not torch.equal(mean, model.net.bn1.running_mean)


def test_frozen_batchnorm_stays_in_eval_mode_under_train():
    model = timm_model(ARCH, num_classes=2, freeze="backbone").train()
    assert model.training and model.net.training
    assert not model.net.bn1.training and not model.net.layer4[0].bn1.training


def test_unfreeze_at_epoch_thaws_backbone_at_that_epoch_not_before():
    model = timm_model(ARCH, num_classes=2, freeze="backbone", unfreeze_at_epoch=3).train()
    everything = {name for name, _ in model.net.named_parameters()}
    for epoch in (1, 2):
        model.cnnreg_epoch_start(epoch)
        assert _trainable(model) == {"fc.weight", "fc.bias"}
        assert not model.net.bn1.training
    model.cnnreg_epoch_start(3)
    assert _trainable(model) == everything
    assert model.net.bn1.training
    model.cnnreg_epoch_start(4)  # and it stays thawed
    assert _trainable(model) == everything


def test_param_groups_carry_backbone_multiplier_and_include_frozen_params():
    model = timm_model(ARCH, num_classes=2, freeze="backbone", backbone_lr_mult=0.1)
    backbone, head = model.cnnreg_param_groups()
    assert backbone["lr_mult"] == 0.1 and head["lr_mult"] == 1.0
    assert {id(p) for p in head["params"]} == {id(p) for p in model.net.get_classifier().parameters()}
    every = [id(p) for p in model.parameters()]
    assert sorted(every) == sorted(id(p) for p in backbone["params"] + head["params"])
    assert not any(p.requires_grad for p in backbone["params"])


def test_unfreeze_last_thaws_exactly_the_last_stages():
    model = timm_model(ARCH, num_classes=2, freeze="backbone", unfreeze_last=2)
    assert len(model.stages) == 5  # stem, layer1..layer4
    expected = {n for n, _ in model.net.named_parameters() if n.startswith(("layer3.", "layer4.", "fc."))}
    assert _trainable(model) == expected


def test_unfreeze_last_beyond_the_stage_count_is_refused():
    with pytest.raises(UserError, match="only 5 stages"):
        timm_model(ARCH, num_classes=2, freeze="backbone", unfreeze_last=6)


def test_unfreeze_options_need_a_frozen_backbone():
    with pytest.raises(ValueError, match="set freeze to 'backbone'"):
        timm_model(ARCH, num_classes=2, unfreeze_last=1)
    with pytest.raises(ValueError, match="set freeze to 'backbone'"):
        torchvision_model("resnet18", num_classes=2, unfreeze_at_epoch=2)


# -- torchvision -------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "head", "size"), [
    ("resnet18", "fc", 64),
    ("mobilenet_v3_small", "classifier.3", 64),
    ("efficientnet_b0", "classifier.1", 64),
    ("squeezenet1_0", "classifier.1", 64),  # a 1x1 convolution, not a Linear
    ("vit_b_16", "heads.head", None),  # the smallest torchvision model with `heads`: no forward, too slow
])
def test_torchvision_head_is_replaced_whatever_it_is_called(arch, head, size):
    model = torchvision_model(arch, num_classes=7).eval()
    layer = model.net.get_submodule(head)
    assert getattr(layer, "out_features", getattr(layer, "out_channels", None)) == 7
    assert model.head == {f"{head}.{n}" for n, _ in layer.named_parameters()}
    if size is not None:
        with torch.no_grad():
            assert model(_batch(size=size)).shape == (2, 7)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return models.resnet18().eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict_file_is_loaded(resnet18, tmp_path, suffix):
    path = _save(resnet18.state_dict(), tmp_path / f"resnet18{suffix}")
    model = torchvision_model("resnet18", weights=str(path), num_classes=3)
    loaded = model.net.state_dict()
    for key, value in resnet18.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert model.net.fc.out_features == 3


def test_torchvision_file_with_own_head_size_keeps_it_when_classes_match(tmp_path):
    torch.manual_seed(0)
    tuned = models.resnet18(num_classes=10)
    path = _save(tuned.state_dict(), tmp_path / "tuned.pth")
    model = torchvision_model("resnet18", weights=str(path), num_classes=10)
    assert torch.equal(model.net.fc.weight, tuned.fc.weight)


def test_torchvision_grayscale_adapts_first_convolution(resnet18, tmp_path):
    path = _save(resnet18.state_dict(), tmp_path / "resnet18.pth")
    model = torchvision_model("resnet18", weights=str(path), num_classes=3, in_channels=1).eval()
    assert torch.allclose(model.net.conv1.weight, resnet18.conv1.weight.sum(dim=1, keepdim=True))
    with torch.no_grad():
        assert model(_batch(channels=1)).shape == (2, 3)


def test_torchvision_mismatched_file_lists_keys(resnet18, tmp_path):
    state = dict(resnet18.state_dict())
    del state["layer4.1.conv2.weight"]
    state["layer9.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError) as error:
        torchvision_model("resnet18", weights=str(path), num_classes=3)
    message = str(error.value)
    assert "layer4.1.conv2.weight" in message and "layer9.weight" in message
    assert "1 key missing" in message and "1 key unexpected" in message


def test_torchvision_weights_enum_loads_from_torch_cache(resnet18, tmp_path, monkeypatch):
    # What torchvision would download, already in torch's cache: no network needed.
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(resnet18.state_dict(), cached)
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = torchvision_model("resnet18", weights=name, num_classes=4)
        assert torch.equal(model.net.layer4[1].conv2.weight, resnet18.layer4[1].conv2.weight)
        assert model.net.fc.out_features == 4
    assert model.cnnreg_data_config == {
        "input_size": (224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear", "crop_pct": 224 / 256, "pretrained": True}


def test_torchvision_unknown_weights_name_lists_the_models_weights():
    with pytest.raises(UserError, match="IMAGENET1K_V1, DEFAULT"):
        torchvision_model("resnet18", weights="IMAGENET9K")
    with pytest.raises(UserError, match="do not belong to torchvision model 'resnet18'.*ResNet18_Weights"):
        torchvision_model("resnet18", weights="ResNet34_Weights.IMAGENET1K_V1")


def test_torchvision_weights_that_look_like_files_are_paths():
    # a Path in a recipe is resolved against the recipe's folder; a weights name stays a name
    adapter = pydantic.TypeAdapter(typing.get_type_hints(torchvision_model, include_extras=True)["weights"])
    assert adapter.validate_python("weights/resnet18.pth") == Path("weights/resnet18.pth")
    assert adapter.validate_python("resnet18.safetensors") == Path("resnet18.safetensors")
    assert adapter.validate_python("ResNet18_Weights.IMAGENET1K_V1") == "ResNet18_Weights.IMAGENET1K_V1"
    assert adapter.validate_python("DEFAULT") == "DEFAULT"


def test_torchvision_unknown_arch_suggests_close_names():
    with pytest.raises(UserError, match="'resnet18'"):
        torchvision_model("resnet_18")


def test_torchvision_freezing_by_top_level_children():
    model = torchvision_model("resnet18", num_classes=2, freeze="backbone", unfreeze_last=1)
    assert model.stage_names == ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    assert _trainable(model) == {n for n, _ in model.net.named_parameters() if n.startswith(("layer4.", "fc."))}
    trunk = torchvision_model("mobilenet_v3_small", num_classes=2, freeze="backbone")
    assert trunk.stage_names[:2] == ("features.0", "features.1")  # the trunk's children are its stages
    assert trunk.stage_names[-1] == "classifier"  # the layers before the replaced Linear


def test_torchvision_data_config_without_weights_is_the_architectures():
    config = torchvision_model("efficientnet_b0", num_classes=2).cnnreg_data_config
    assert config["input_size"] == (224, 224) and config["interpolation"] == "bicubic"
    assert config["pretrained"] is False


# -- registration ------------------------------------------------------------------


def test_registers_both_families_with_lazy_member_lists():
    families = cnnreg_models()
    assert set(families) == {"timm", "torchvision"}
    assert all(isinstance(f, Family) and f.param == "arch" for f in families.values())
    assert ARCH in families["timm"].list_members()
    assert "resnet18" in families["torchvision"].list_members()


def test_importing_the_plugin_imports_neither_timm_nor_torchvision_models():
    code = ("import sys, cnnreg_plugins.transfer; "
            "print(sorted(m for m in ('timm', 'torchvision', 'torchvision.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
