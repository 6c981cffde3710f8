"""Transfer learning: any timm or torchvision classifier with a new head.

The classic tutorial fine-tunes a pretrained ResNet-18 with its last layer
replaced, optionally with the rest frozen. Here that works for every timm
architecture (``{"name": "timm:convnext_tiny", "pretrained": true}``) and
every torchvision classification model (``{"name": "torchvision:resnet18",
"weights": "DEFAULT"}``), from the hub or from a local weights file.

Both factories return a :class:`TransferModel`, which tells the engine three
things besides computing logits: its parameter groups (backbone and head, so
the backbone can get its own learning-rate multiplier), what to do at the
start of each epoch (gradual unfreezing), and the preprocessing its weights
expect (``cnnreg_data_config``).

timm and torchvision.models are imported inside the functions only: every
cnnreg command imports this module, and timm alone takes seconds to import.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Mapping

import torch
from pydantic import BeforeValidator, Field
from torch import nn

from cnnreg.core.errors import Unavailable, UserError
from cnnreg import hookimpl
from cnnreg import Family

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from torchvision.models import WeightsEnum

Freeze = Literal["none", "backbone"]
Shapes = Mapping[str, tuple[int, ...]]

_WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _file_if_path_like(value: Any) -> Any:
    """A weights value with a file suffix or a folder in it is a file, else a weights name.

    A recipe resolves ``Path`` values against its own folder; but in
    ``str | Path`` a string always validates as the ``str``, so a file has to
    become a ``Path`` before the union is tried.
    """
    if isinstance(value, str) and (value.lower().endswith(_WEIGHTS_SUFFIXES) or "/" in value or "\\" in value):
        return Path(value)
    return value


TorchvisionWeights = Annotated[str | Path | None, BeforeValidator(_file_if_path_like)]

# BatchNorm layers whose running statistics would drift in train mode; timm's
# BatchNormAct2d subclasses BatchNorm2d, and its FrozenBatchNorm2d has none.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# torchvision keeps a whole convolutional trunk in one top-level container
# (VGG, MobileNet, EfficientNet, ConvNeXt, Swin and DenseNet call it
# "features", MNASNet "layers", RegNet "trunk_output", MaxViT "blocks"); its
# children are the stages that `unfreeze_last` counts.
_TORCHVISION_TRUNKS = ("features", "layers", "trunk_output", "blocks")

# In training mode these return auxiliary logits too; built without them,
# forward(x) is plain logits (the pretrained auxiliary heads are dropped).
_TORCHVISION_AUX_LOGITS = ("googlenet", "inception_v3")

_SHOWN_KEYS = 5  # keys listed per kind of misfit in a weights-file error


# -- the model ---------------------------------------------------------------------


@dataclass(frozen=True)
class FreezePlan:
    """Which parts of a pretrained network train, and from when.

    :param freeze: "none" trains everything; "backbone" trains the head (and
        the last ``unfreeze_last`` stages) only.
    :param unfreeze_last: backbone stages, counted from the end, that train
        while the rest is frozen.
    :param unfreeze_at_epoch: the 1-based epoch from whose start the whole
        backbone trains; ``None`` keeps it frozen.
    :param backbone_lr_mult: the learning-rate multiplier of the backbone.
    """

    freeze: Freeze = "none"
    unfreeze_last: int = 0
    unfreeze_at_epoch: int | None = None
    backbone_lr_mult: float = 1.0


def freeze_plan(freeze: str, unfreeze_last: int, unfreeze_at_epoch: int | None, backbone_lr_mult: float) -> FreezePlan:
    """Check the freezing options together (a recipe's schema checks each alone)."""
    if freeze not in ("none", "backbone"):
        raise ValueError(f"freeze must be 'none' or 'backbone', not {freeze!r}")
    if unfreeze_last < 0:
        raise ValueError(f"unfreeze_last must be >= 0, not {unfreeze_last}")
    if unfreeze_at_epoch is not None and unfreeze_at_epoch < 1:
        raise ValueError(f"unfreeze_at_epoch is 1-based: it must be >= 1, not {unfreeze_at_epoch}")
    if backbone_lr_mult < 0:
        raise ValueError(f"backbone_lr_mult must be >= 0, not {backbone_lr_mult}")
    if freeze == "none" and (unfreeze_last or unfreeze_at_epoch is not None):
        option = "unfreeze_last" if unfreeze_last else "unfreeze_at_epoch"
        raise ValueError(f"{option} only applies to a frozen backbone: set freeze to 'backbone' as well")
    return FreezePlan(freeze, unfreeze_last, unfreeze_at_epoch, backbone_lr_mult)  # type: ignore[arg-type]


class TransferModel(nn.Module):
    """A pretrained network with a new head, and the freezing schedule that goes with it.

    ``forward`` is the network's own, and so are the weights files: the
    network is the model's ``cnnreg_weights_module``, so best.safetensors
    holds its keys (no ``net.`` prefix) and loads into a plain
    ``timm.create_model(arch, num_classes=N)`` or torchvision model; the
    file's metadata (``cnnreg_weights_metadata``) names the library, the
    architecture and the class count. Everything else here (head, stages,
    plan) is plain Python rebuilt from the recipe: the network's state dict
    is the whole model's state. Frozen parameters have
    ``requires_grad=False``; frozen BatchNorm layers stay in eval mode
    (their running statistics do not move) even when the engine calls ``train()``.

    :param net: the whole network, head included.
    :param head: names (in ``net``) of the head's parameters.
    :param stages: the backbone's stages in forward order, as
        ``(label, parameter names)``.
    :param plan: what is frozen and when it thaws.
    :param data_config: the preprocessing the weights expect
        (see :attr:`cnnreg_data_config`).
    :param source: how to rebuild ``net`` without cnnreg (library, arch,
        num_classes...), written into weights files' metadata.
    """

    def __init__(self, net: nn.Module, head: Iterable[str], stages: Iterable[tuple[str, tuple[str, ...]]],
                 plan: FreezePlan, data_config: dict[str, Any], source: Mapping[str, str] | None = None):
        super().__init__()
        self.net = net
        self.cnnreg_weights_metadata = dict(source or {})
        self.head = frozenset(head)
        self.stages = tuple(stages)
        self.plan = plan
        #: "input_size" (H, W), "mean", "std" (one value per input channel),
        #: "interpolation", "crop_pct", and "pretrained": whether weights were
        #: loaded (without them input_size is only the architecture's native size).
        self.cnnreg_data_config = data_config
        if plan.unfreeze_last > len(self.stages):
            labels = ", ".join(label for label, _ in self.stages)
            raise UserError(f"unfreeze_last is {plan.unfreeze_last} but the backbone has only {len(self.stages)} "
                            f"stages ({labels}); use at most {len(self.stages)}, or freeze 'none' to train all of it")
        if plan.freeze == "none" or plan.unfreeze_at_epoch == 1:
            self._set_trainable(None)
        else:
            thawed = self.stages[len(self.stages) - plan.unfreeze_last:]
            self._set_trainable(self.head.union(*(names for _, names in thawed)))

    @property
    def cnnreg_weights_module(self) -> nn.Module:
        """What weights files hold: the network itself, in its library's own key layout."""
        return self.net

    @property
    def stage_names(self) -> tuple[str, ...]:
        """A label for each backbone stage, in forward order."""
        return tuple(label for label, _ in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if _is_frozen_norm(module):
                    module.eval()
        return self

    def cnnreg_param_groups(self) -> list[dict[str, Any]]:
        """Backbone and head parameters, frozen ones included.

        Optimizers skip parameters that have no gradient, so a backbone that
        is unfrozen later trains without building a new optimizer.
        """
        named = list(self.net.named_parameters())
        return [
            {"params": [p for name, p in named if name not in self.head], "lr_mult": self.plan.backbone_lr_mult},
            {"params": [p for name, p in named if name in self.head], "lr_mult": 1.0},
        ]

    def cnnreg_epoch_start(self, epoch: int) -> None:
        """Thaw the whole backbone from the start of epoch ``unfreeze_at_epoch`` (1-based).

        ``>=`` rather than ``==``, so a run resumed past that epoch trains
        the same network as one that went through it.
        """
        if self.plan.unfreeze_at_epoch is not None and epoch >= self.plan.unfreeze_at_epoch:
            self._set_trainable(None)

    def _set_trainable(self, names: frozenset[str] | None) -> None:
        """Let the parameters in ``names`` train (all when ``None``), freeze the rest."""
        for name, param in self.net.named_parameters():
            param.requires_grad_(names is None or name in names)
        self.train(self.training)  # thawed BatchNorm goes back to train mode, frozen to eval


def _is_frozen_norm(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return isinstance(module, _BATCH_NORMS) and bool(params) and not any(p.requires_grad for p in params)


# -- timm --------------------------------------------------------------------------


def timm_model(
    arch: str,
    pretrained: bool | Path = False,
    num_classes: Annotated[int, Field(ge=1)] = 1000,
    in_channels: Annotated[int, Field(ge=1)] = 3,
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] | None = None,
    freeze: Freeze = "none",
    unfreeze_last: Annotated[int, Field(ge=0)] = 0,
    unfreeze_at_epoch: Annotated[int, Field(ge=1)] | None = None,
    backbone_lr_mult: Annotated[float, Field(ge=0)] = 1.0,
) -> TransferModel:
    """Any timm architecture, pretrained or not, with a head sized to the dataset.

    Args:
        arch: the timm model name, optionally with a pretrained tag
            ("resnet18", "convnext_tiny.fb_in22k"); `cnnreg ls models 'timm:*'` lists them.
        pretrained: false (random initialisation), true (timm downloads the
            weights from its hub, or finds them in the local cache), or the
            path of a weights file (.safetensors, .pth, .bin) in timm's layout
            for this architecture.
        num_classes: size of the new head; the pretrained head is kept only
            when it already has this size.
        in_channels: input channels; pretrained filters of the first
            convolution are summed (1 channel) or repeated (more than 3) as timm does.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate, for architectures that have it.
        freeze: "backbone" trains only the head (feature extraction), "none" everything.
        unfreeze_last: with a frozen backbone, train its last N stages too
            (timm's coarse parameter groups: for ResNets the stem and layer1..layer4).
        unfreeze_at_epoch: with a frozen backbone, train all of it from this epoch on (1-based).
        backbone_lr_mult: learning-rate multiplier of the backbone (the head's is 1).
    """
    import timm

    plan = freeze_plan(freeze, unfreeze_last, unfreeze_at_epoch, backbone_lr_mult)
    _check_timm_arch(arch)
    options: dict[str, Any] = {"in_chans": in_channels}
    if drop_rate:  # not every architecture takes these: pass them only when asked for
        options["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        options["drop_path_rate"] = drop_path_rate

    if pretrained is False:
        net = _build_timm(arch, options, num_classes=num_classes)
    elif pretrained is True:
        net = _timm_from_hub(arch, options, num_classes)
    else:
        net = _timm_from_file(arch, options, num_classes, _existing_file(Path(pretrained), "timm", arch))

    classifier = net.get_classifier()
    head_ids = {id(p) for m in (classifier if isinstance(classifier, tuple) else (classifier,)) for p in m.parameters()}
    head = frozenset(name for name, p in net.named_parameters() if id(p) in head_ids)
    if not head:
        raise UserError(f"timm model {arch!r} has no classifier parameters to train; it cannot be fine-tuned as a classifier")
    config = _timm_data_config(net, in_channels, pretrained=pretrained is not False)
    chans = f", in_chans={in_channels}" if in_channels != 3 else ""
    source = _source("timm", arch, num_classes, in_channels,
                     f"timm.create_model({arch!r}, num_classes={num_classes}{chans})")
    return TransferModel(net, head, _timm_stages(net, head), plan, config, source)


def _check_timm_arch(arch: str) -> None:
    import timm
    from timm.models import get_pretrained_cfg

    _check_arch("timm", arch, timm.is_model(arch), timm_archs)
    base, dot, _ = arch.partition(".")
    if dot:
        try:
            get_pretrained_cfg(arch)
        except RuntimeError:
            tags = timm.list_pretrained(f"{base}.*")
            raise UserError(f"timm architecture {base!r} has no pretrained tag {arch!r}; "
                            f"its tags: {', '.join(tags) or 'none'}") from None


def timm_archs() -> list[str]:
    """Every timm architecture name."""
    import timm

    return timm.list_models()


def _build_timm(arch: str, options: dict[str, Any], **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, **kwargs, **options)
    except TypeError as exc:
        refused = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if refused is None:
            raise
        option = {"in_chans": "in_channels"}.get(refused.group(1), refused.group(1))
        raise UserError(f"timm model {arch!r} does not take {option}: leave it out of the recipe") from None


def _timm_from_hub(arch: str, options: dict[str, Any], num_classes: int) -> nn.Module:
    """timm's own download (Hugging Face hub or URL), or its local cache."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is not None and cfg.hf_hub_id:
        where = f"model.safetensors from https://huggingface.co/{cfg.hf_hub_id}"
    else:
        where = cfg.url if cfg is not None and cfg.url else f"the weights of {arch}"
    try:
        # With num_classes different from the weights', timm drops their classifier.
        return _build_timm(arch, options, pretrained=True, num_classes=num_classes)
    except RuntimeError as exc:
        if "No pretrained weights exist" not in str(exc):
            raise
        raise UserError(f"timm has no pretrained weights for {arch!r} ({exc}); set pretrained to false, "
                        f"use a tag that has weights (`timm.list_pretrained('{arch.split('.')[0]}*')`), "
                        f"or give a weights file") from None
    except Exception as exc:
        if not _is_download_error(exc):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unavailable(
            f"could not get pretrained weights for timm model {arch!r}: no network was reached "
            f"(or offline mode is on) and they are not in the local cache ({reason}). "
            f"On a machine with a network, download {where} and give the file: "
            f'"pretrained": "path/to/model.safetensors"', retry_with=_WITHOUT_WEIGHTS["timm"]) from None


def _timm_from_file(arch: str, options: dict[str, Any], num_classes: int, path: Path) -> nn.Module:
    """Load a weights file through timm's own loader.

    timm's loader adapts the first convolution to ``in_chans`` and applies the
    architecture's checkpoint filter. When the head sizes differ it drops the
    file's classifier and loads the rest *non-strictly*, silently leaving
    missing layers random; so the model is built with the file's own head
    size, loaded strictly, and only then given a new head.
    """
    from timm.models import get_pretrained_cfg

    shapes = _file_shapes(path)
    cfg = get_pretrained_cfg(arch)
    file_classes = _file_head_size(shapes, cfg.classifier if cfg else None, cfg.num_classes if cfg else 1000)
    overlay = {"file": str(path), "num_classes": file_classes}
    try:
        net = _build_timm(arch, options, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=file_classes)
    except RuntimeError as exc:  # torch's strict load, or timm's input-conv check
        pretrained_chans = (cfg.input_size if cfg and cfg.input_size else (3,))[0]
        expected = _timm_layout(arch, {**options, "in_chans": pretrained_chans}, file_classes)
        raise _misfit_error(path, f"timm model {arch!r}", shapes, expected, str(exc)) from None
    if file_classes != num_classes:
        net.reset_classifier(num_classes)
    return net


def _timm_layout(arch: str, options: dict[str, Any], num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of a timm model, built on the meta device (no
    memory, no initialisation) unless the architecture needs real tensors to build."""
    try:
        with torch.device("meta"):
            return _shapes(_build_timm(arch, options, num_classes=num_classes).state_dict())
    except (NotImplementedError, RuntimeError):
        return _shapes(_build_timm(arch, options, num_classes=num_classes).state_dict())


def _timm_stages(net: nn.Module, head: frozenset[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The backbone's stages: timm's coarse parameter groups (the ones its
    layer-wise learning-rate decay uses), in forward order, head left out."""
    from timm.models import group_parameters

    try:
        matcher = net.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return _module_stages(net, head, trunks=())
    stages: list[tuple[str, tuple[str, ...]]] = []
    groups = group_parameters(net, matcher)
    for key in sorted(groups):
        names = groups[key]
        body = tuple(name for name in names if name not in head)
        if len(body) < len(names) and stages:
            # The group holding the classifier: what else it holds (a head
            # norm, say) belongs with the last stage, not a stage of its own.
            label, last = stages[-1]
            stages[-1] = (label, last + body)
        elif body:
            stages.append((_label(body), body))
    return stages


def _timm_data_config(net: nn.Module, in_channels: int, pretrained: bool) -> dict[str, Any]:
    """timm's data config for the model (what its train.py uses, with or
    without pretrained weights: the architecture's defaults when not)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=net)
    return {
        "input_size": tuple(config["input_size"][-2:]),
        "mean": _per_channel(config["mean"], in_channels),
        "std": _per_channel(config["std"], in_channels),
        "interpolation": config["interpolation"],
        "crop_pct": float(config["crop_pct"]),
        "pretrained": pretrained,
    }


# -- torchvision -------------------------------------------------------------------


def torchvision_model(
    arch: str,
    weights: TorchvisionWeights = None,
    num_classes: Annotated[int, Field(ge=1)] = 1000,
    in_channels: Annotated[int, Field(ge=1)] = 3,
    freeze: Freeze = "none",
    unfreeze_last: Annotated[int, Field(ge=0)] = 0,
    unfreeze_at_epoch: Annotated[int, Field(ge=1)] | None = None,
    backbone_lr_mult: Annotated[float, Field(ge=0)] = 1.0,
) -> TransferModel:
    """A torchvision classification model, pretrained or not, with its head replaced.

    Args:
        arch: the torchvision model name ("resnet18", "efficientnet_b0");
            `cnnreg ls models 'torchvision:*'` lists them.
        weights: none for random initialisation; "DEFAULT" or a weights name of
            this model ("IMAGENET1K_V1", or in full "ResNet18_Weights.IMAGENET1K_V1"),
            downloaded by torchvision or found in torch's cache; or the path of a
            state dict file (.pth, .safetensors) for this model.
        num_classes: size of the new head (the last layer whatever it is called:
            fc, classifier, heads.head...); the pretrained head is kept only
            when it already has this size.
        in_channels: input channels; the first convolution's pretrained filters
            are summed (1 channel) or repeated (more than 3) as timm does.
        freeze: "backbone" trains only the head (feature extraction), "none" everything.
        unfreeze_last: with a frozen backbone, train its last N stages too
            (top-level children, the trunk's children for "features" and the like).
        unfreeze_at_epoch: with a frozen backbone, train all of it from this epoch on (1-based).
        backbone_lr_mult: learning-rate multiplier of the backbone (the head's is 1).
    """
    from torchvision import models

    plan = freeze_plan(freeze, unfreeze_last, unfreeze_at_epoch, backbone_lr_mult)
    _check_arch("torchvision", arch, arch in torchvision_archs(), torchvision_archs)
    options = {"aux_logits": False} if arch in _TORCHVISION_AUX_LOGITS else {}
    source = _torchvision_weights(arch, weights)

    if isinstance(source, Path):
        net = models.get_model(arch, weights=None, **options)
        head_name = _find_head(net, arch, classes=1000)
        _load_torchvision_file(net, arch, head_name, source)
    else:
        net = _torchvision_download(arch, source, options)
        head_name = _find_head(net, arch, classes=len(source.meta["categories"]) if source else 1000)
    if _head_size(net.get_submodule(head_name)) != num_classes:
        net.set_submodule(head_name, _new_head(net.get_submodule(head_name), num_classes))

    default = source if source is not None and not isinstance(source, Path) else models.get_model_weights(arch).DEFAULT
    config = _torchvision_data_config(default, in_channels, pretrained=source is not None)
    if in_channels != 3:
        _adapt_first_conv(net, arch, in_channels)
        if getattr(net, "transform_input", False):
            # Inception's transform_input turns ImageNet-normalised RGB into
            # (x - 0.5) / 0.5 inside forward, which needs 3 channels; without
            # it the same weights want exactly that normalisation from the data.
            net.transform_input = False
            config.update(mean=(0.5,) * in_channels, std=(0.5,) * in_channels)

    head = frozenset(f"{head_name}.{name}" for name, _ in net.get_submodule(head_name).named_parameters())
    extra = "".join(f", {k}={v!r}" for k, v in options.items())
    if getattr(net, "transform_input", False):
        extra += ", transform_input=True"  # set by pretrained Inception weights; not part of the state dict
    rebuild = f"torchvision.models.get_model({arch!r}, num_classes={num_classes}{extra})"
    if in_channels != 3:
        rebuild += f", its first convolution then given {in_channels} input channels"
    source = _source("torchvision", arch, num_classes, in_channels, rebuild)
    return TransferModel(net, head, _module_stages(net, head, trunks=_TORCHVISION_TRUNKS), plan, config, source)


def torchvision_archs() -> list[str]:
    """Every torchvision classification model name."""
    from torchvision import models

    return models.list_models(module=models)


def _torchvision_weights(arch: str, weights: str | Path | None) -> WeightsEnum | Path | None:
    """The weights enum member a name means, or a file path."""
    from torchvision import models

    if weights is None:
        return None
    if isinstance(weights, Path):
        return _existing_file(weights, "torchvision", arch)
    enum = models.get_model_weights(arch)
    names = list(enum.__members__)
    enum_name, dot, member = weights.partition(".")
    if not dot and weights in names:
        return enum[weights]
    if dot and enum_name == enum.__name__ and member in names:
        return enum[member]
    if dot and enum_name.endswith("_Weights") and "/" not in weights:
        raise UserError(f"weights {weights!r} do not belong to torchvision model {arch!r}; "
                        f"it takes {enum.__name__}: {', '.join(names)}")
    path = Path(weights)
    if path.is_file():
        return path
    raise UserError(f"weights {weights!r} are neither a weights name of torchvision model {arch!r} "
                    f"({', '.join(names)}) nor an existing file (looked for {path.absolute()})")


def _torchvision_download(arch: str, weights: WeightsEnum | None, options: dict[str, Any]) -> nn.Module:
    from torchvision import models

    try:
        return models.get_model(arch, weights=weights, **options)
    except OSError as exc:  # urllib's URLError, a refused connection, a timeout
        if weights is None:
            raise
        raise Unavailable(
            f"could not download the {weights} weights of torchvision model {arch!r}: no network was reached "
            f"and they are not in torch's cache ({exc}). On a machine with a network, download {weights.url} "
            f'and give the file: "weights": "path/to/{Path(weights.url).name}" (or put it in '
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} and keep the name)",
            retry_with=_WITHOUT_WEIGHTS["torchvision"]) from None


def _load_torchvision_file(net: nn.Module, arch: str, head_name: str, path: Path) -> None:
    """Load a state dict file strictly, except that the head may be missing
    or of another size (it is replaced anyway when the sizes differ)."""
    state = _read_state_dict(path)
    head_weight = state.get(f"{head_name}.weight")
    if head_weight is not None and head_weight.shape[0] != _head_size(net.get_submodule(head_name)):
        net.set_submodule(head_name, _new_head(net.get_submodule(head_name), head_weight.shape[0]))
    optional = () if head_weight is not None else tuple(f"{head_name}.{n}" for n, _ in net.get_submodule(head_name).named_parameters())
    file_shapes = _shapes(state)
    expected = {k: v for k, v in _shapes(net.state_dict()).items() if k not in optional}
    error = _misfit_error(path, f"torchvision model {arch!r}", file_shapes, expected, "")
    if error is not None:
        raise error
    net.load_state_dict(state, strict=False)  # the check above is strict, head aside


def _find_head(net: nn.Module, arch: str, classes: int) -> str:
    """The name of the classifier: the last Linear (or 1x1 convolution, for
    SqueezeNet) in module order whose output size is the class count."""
    found = [name for name, module in net.named_modules() if _head_size(module) == classes]
    if not found:
        raise UserError(f"torchvision model {arch!r} has no final Linear or 1x1 convolution with {classes} outputs; "
                        f"it cannot be given a new head: use a classification model (`cnnreg ls models 'torchvision:*'`)")
    return found[-1]


def _head_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return module.out_channels
    return None


def _new_head(old: nn.Module, classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, classes, bias=old.bias is not None)
    assert isinstance(old, nn.Conv2d)
    return nn.Conv2d(old.in_channels, classes, kernel_size=1, bias=old.bias is not None)


def _adapt_first_conv(net: nn.Module, arch: str, in_channels: int) -> None:
    """Give the first 3-channel convolution ``in_channels`` inputs, its
    filters adapted by timm's rule (summed for 1, repeated and rescaled for more)."""
    from timm.models import adapt_input_conv

    found = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if found is None or found[1].groups != 1:
        raise UserError(f"torchvision model {arch!r}: found no input convolution to adapt to {in_channels} channels; "
                        f"give it 3-channel images instead (set in_channels to 3 and convert the images to RGB)")
    name, conv = found
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    net.set_submodule(name, new)


def _torchvision_data_config(weights: WeightsEnum, in_channels: int, pretrained: bool) -> dict[str, Any]:
    """The preprocessing of a weights enum, read from its transforms preset
    (metadata only: nothing is downloaded)."""
    preset = weights.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return {
        "input_size": (crop, crop),
        "mean": _per_channel(preset.mean, in_channels),
        "std": _per_channel(preset.std, in_channels),
        "interpolation": preset.interpolation.value,
        "crop_pct": crop / resize,
        "pretrained": pretrained,
    }


# -- shared helpers ----------------------------------------------------------------


def _check_arch(library: str, arch: str, known: bool, names: Any) -> None:
    if known:
        return
    close = difflib.get_close_matches(arch, names(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UserError(f"unknown {library} architecture {arch!r}{hint} (`cnnreg ls models '{library}:*'` lists them all)")


def _source(library: str, arch: str, num_classes: int, in_channels: int, rebuild: str) -> dict[str, str]:
    """The metadata of a transfer model's weights files: what network they fit and how to build it."""
    return {"library": library, "arch": arch, "num_classes": str(num_classes), "in_channels": str(in_channels),
            "rebuild": rebuild}


# What builds the same architecture without its weights, for `cnnreg validate`.
_WITHOUT_WEIGHTS = {"timm": {"pretrained": False}, "torchvision": {"weights": None}}


def _existing_file(path: Path, library: str, arch: str) -> Path:
    if not path.is_file():
        raise Unavailable(f"weights file for {library} model {arch!r} not found: {path} (looked for {path.absolute()})",
                          retry_with=_WITHOUT_WEIGHTS[library])
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (loaded with
    weights_only), unwrapped from a training checkpoint if need be."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise UserError(f"could not read weights file {path}: {type(exc).__name__}: {exc}. It must be a state dict "
                        f"saved with safetensors or torch.save(model.state_dict(), ...)") from None


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a weights file: from the header alone for safetensors."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise UserError(f"could not read weights file {path}: {exc}; it must be a safetensors file") from None
    # A pickled state dict has no header: read it whole (timm reads it again).
    return _shapes(_read_state_dict(path))


def _file_head_size(shapes: Shapes, classifier: str | tuple[str, ...] | None, default: int) -> int:
    """The class count of a file's classifier; 0 for a file without one."""
    if not classifier:
        return default
    first = classifier if isinstance(classifier, str) else classifier[0]
    shape = shapes.get(f"{first}.weight")
    return shape[0] if shape else 0


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _misfit_error(path: Path, model: str, found: Shapes, expected: Shapes, detail: str) -> UserError | None:
    """What keeps a weights file from fitting a model; ``None`` when it fits.

    BatchNorm's ``num_batches_tracked`` may be missing: torch fills it.
    """
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k} {found[k]} in the file, {expected[k]} in the model"
                  for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return UserError(f"weights file {path} could not be loaded into {model}: {detail}") if detail else None
    lines = [f"weights file {path} does not fit {model}:"]
    for what, keys in (("missing (in the model, not in the file)", missing),
                       ("unexpected (in the file, not in the model)", unexpected),
                       ("of another shape", mismatched)):
        if keys:
            more = f", and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
            lines.append(f"  {len(keys)} {'key' if len(keys) == 1 else 'keys'} {what}: "
                         f"{', '.join(keys[:_SHOWN_KEYS])}{more}")
    lines.append(f"Check that the file holds the weights of exactly this architecture ({model}).")
    return UserError("\n".join(lines))


def _per_channel(values: Iterable[float], channels: int) -> tuple[float, ...]:
    """Per-channel statistics for ``channels`` inputs, matching timm's filter
    adaptation: one channel sums the RGB filters (so it sees the average
    statistics), more channels cycle through them."""
    values = tuple(float(v) for v in values)
    if channels == len(values):
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def _module_stages(net: nn.Module, head: frozenset[str], trunks: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """Stages from the module tree: top-level children in order, a trunk
    container's children in its place. Parameters no child holds (ViT's
    class token, held by the root) join the first stage."""
    parts: list[tuple[str, nn.Module]] = []
    for name, child in net.named_children():
        if name in trunks and len(list(child.children())) > 1:
            parts.extend((f"{name}.{sub}", module) for sub, module in child.named_children())
        else:
            parts.append((name, child))
    stages = []
    for label, module in parts:
        names = tuple(f"{label}.{n}" for n, _ in module.named_parameters() if f"{label}.{n}" not in head)
        if names:
            stages.append((label, names))
    placed = {name for _, names in stages for name in names}
    loose = tuple(n for n, _ in net.named_parameters() if n not in head and n not in placed)
    if loose:
        label, first = stages[0] if stages else ("root", ())
        stages[:1] = [(label, loose + first)]
    return stages


def _label(names: tuple[str, ...]) -> str:
    """A short name for a group of parameters: their common module path
    ("layer1", "blocks.3"), else their distinct top-level modules ("conv1, bn1")."""
    parts = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if common:
        return ".".join(common)
    return ", ".join(dict.fromkeys(name.split(".")[0] for name in names))


def _is_download_error(exc: BaseException) -> bool:
    """Whether an exception from a weight download means the weights could
    not be fetched: huggingface_hub's errors (a missing local entry when
    offline) and urllib's are OSErrors; httpx's and requests' are their own."""
    module = type(exc).__module__
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.startswith(
        ("huggingface_hub", "httpx", "requests", "urllib3"))


@hookimpl
def cnnreg_models() -> dict[str, Family]:
    return {
        "timm": Family(timm_model, list_members=timm_archs, param="arch"),
        "torchvision": Family(torchvision_model, list_members=torchvision_archs, param="arch"),
    }
