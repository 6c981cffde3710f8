"""Exporting a run's model, and proving the export computes the same thing.

Every format but safetensors holds the eval transforms and the model, taking
``[B, C, H, W]`` floats in [0, 1] at the run's image size; with
``preprocessing`` (onnx, pt2) it takes uint8 images of any height and width
and brings them to the run's size first, exactly as ``cnnreg predict`` does
(:mod:`cnnreg.inputs.graph_fit`). Decoding stays outside the graph: the
caller gives upright RGB (or grayscale) pixels; predict also lets libjpeg
decode a JPEG at 1/2, 1/4 or 1/8 scale when that still covers the run's
size, which a graph given the full pixels cannot repeat (PNG and small
JPEGs match exactly). safetensors holds the weights only, in the
key layout of the network itself (see :func:`cnnreg.core.checkpoint.save_weights`),
with metadata that says how to build it.

A calibrated run (``cnnreg calibrate``) exports calibrated logits: the
graph formats divide by the temperature inside the graph, so the file's
output is ``logits / T`` and its softmax the calibrated confidences;
safetensors, weights only, records T in its metadata for the caller to
apply. Every format's metadata says ``temperature``.

Each export is loaded back and run against the model on a batch (for
``preprocessing``, on images of two other sizes, also against predict's own
resize); an export that computes something else is an error (exit status 2).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cnnreg.core import checkpoint
from cnnreg.core.device import full_precision
from cnnreg.core.errors import UserError
from cnnreg.core.version import version
from cnnreg.inputs.graph_fit import GraphFit
from cnnreg.inputs.prepare import merge_views, view_weights
from cnnreg.workflows.predict import Predictor

FORMATS = ("onnx", "pt2", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
WITH_PREPROCESSING = ("onnx", "pt2")


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote and how it was checked.

    :param max_abs_diff: the largest difference of logits between the file
        (loaded back) and the model, over every batch checked.
    :param inputs: the input contract, in words (also in the file's metadata).
    :param checked_sizes: the image sizes (height, width) the file was run on.
    :param max_abs_diff_vs_predict: with preprocessing, the largest difference
        from the model fed by predict's own resize (``fit_image``).
    """

    path: Path
    format: str
    max_abs_diff: float
    inputs: str
    preprocessing: bool = False
    checked_sizes: tuple[tuple[int, int], ...] = ()
    max_abs_diff_vs_predict: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None  # the calibration temperature baked in (graphs) or recorded (safetensors)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "max_abs_diff": self.max_abs_diff,
                "preprocessing": self.preprocessing, "inputs": self.inputs,
                "checked_sizes": [list(s) for s in self.checked_sizes],
                "max_abs_diff_vs_predict": self.max_abs_diff_vs_predict, "metadata": self.metadata,
                "temperature": self.temperature}


def export(p: Predictor, fmt: str, output: Path | None, run_dir: Path, tolerance: float = 1e-4,
           preprocessing: bool = False) -> Exported:
    """Write the run's model as ``fmt`` and check it against the original.

    :param preprocessing: (onnx, pt2) the file takes uint8 ``[B, C, H, W]``
        images of any size and resizes them as the run does.
    :raises UserError: an unknown format, TorchScript on a torch that
        deprecates it, an export that fails or whose outputs differ.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    if preprocessing and fmt not in WITH_PREPROCESSING:
        raise UserError(f"--preprocessing needs a graph format ({' or '.join(WITH_PREPROCESSING)}); "
                        f"{fmt} {'holds weights only' if fmt == 'safetensors' else 'is not one'}: "
                        f"use --format pt2 or onnx, or leave out --preprocessing")
    if fmt == "torchscript":
        _refuse_deprecated_torchscript()
    path = Path(output) if output is not None else Path(run_dir) / f"model{SUFFIX[fmt]}"
    model = full_precision(checkpoint.unwrap(p.model)).cpu().eval()
    fit = GraphFit(p.image_size, p.fit) if preprocessing else None
    module = _Exportable(model, p.transforms, fit, p.temperature).eval()
    inputs = _contract(p, fmt, preprocessing)
    examples = _examples(p, preprocessing)
    metadata = {**checkpoint.weights_metadata(model), **_metadata(p, inputs, preprocessing)}
    # The references first, before any tracing: a transform that caches a constant on first use
    # (normalize's channel_constant) would otherwise keep the exporter's fake tensor, and the
    # module would return fake tensors ever after.
    with torch.no_grad():
        expected = [module(example) for example in examples]
        by_predict = [_as_predict_does(p, module, example) for example in examples] if fit is not None else []
    try:
        if fmt == "safetensors":
            checkpoint.save_weights(model, path, metadata=metadata)
            reloaded = _reload_safetensors(module, path)
        elif fmt == "torchscript":
            traced = torch.jit.trace(module, examples[0])
            checkpoint.atomic_write(path, lambda tmp: traced.save(str(tmp)))
            reloaded = torch.jit.load(str(path))
        elif fmt == "pt2":
            reloaded = _pt2(module, examples[0], path, metadata, preprocessing)
        else:
            reloaded = _onnx(module, examples[0], path, metadata, preprocessing)
        error = vs_predict = 0.0
        for i, example in enumerate(examples):
            with torch.no_grad():
                actual = torch.as_tensor(reloaded(example))
            error = max(error, _difference(actual, expected[i], fmt, path, tolerance))
            if by_predict:
                vs_predict = max(vs_predict, _difference(actual, by_predict[i], fmt, path, tolerance,
                                                         against="cnnreg predict"))
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many types; the user needs the reason, not the stack
        raise UserError(f"exporting to {fmt} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    sizes = tuple((int(e.shape[-2]), int(e.shape[-1])) for e in examples)
    return Exported(path=path, format=fmt, max_abs_diff=error, inputs=inputs, preprocessing=preprocessing,
                    checked_sizes=sizes, max_abs_diff_vs_predict=vs_predict if fit is not None else None,
                    metadata=metadata, temperature=p.temperature)


class _Exportable(torch.nn.Module):
    """The resize (with preprocessing), the eval transforms, the model and the calibration
    temperature (when the run has one) as one module, for exporting."""

    def __init__(self, model: torch.nn.Module, transforms: tuple, fit: GraphFit | None = None,
                 temperature: float | None = None):
        super().__init__()
        self.fit = fit
        self.model = model
        self.transforms = list(transforms)
        self.views = view_weights(self.transforms)  # test-time augmentation: one merged answer per image
        self.temperature = temperature  # a Python float: a constant in the exported graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fit is not None:  # uint8 at any size -> the run's size, in [0, 1] (predict's prepare_batch)
            x = self.fit(x).to(torch.float32).div(255)
        for transform in self.transforms:
            x = transform(x)
        logits = merge_views(self.model(x), self.views)
        return logits / self.temperature if self.temperature is not None else logits


# -- what goes in, what is said about it ------------------------------------------------------


def _examples(p: Predictor, preprocessing: bool) -> list[torch.Tensor]:
    """The batches the export is traced with ([0]) and checked on: with preprocessing,
    uint8 images of two sizes other than the run's (one larger, one smaller, other aspect ratios)."""
    generator = torch.Generator().manual_seed(0)
    if not preprocessing:
        return [torch.rand(4, p.channels, *p.image_size, generator=generator)]
    h, w = p.image_size
    sizes = [(h + max(3, h // 2), w * 2 + 1), (max(2, h // 2 + 1), max(2, w - w // 3))]
    return [torch.randint(0, 256, (3 - i, p.channels, *size), dtype=torch.uint8, generator=generator)
            for i, size in enumerate(sizes)]


def _contract(p: Predictor, fmt: str, preprocessing: bool) -> str:
    if p.temperature is not None:
        return _uncalibrated_contract(p, fmt, preprocessing) + (
            f" (not divided by the calibration temperature {p.temperature:.6g}: divide them by it yourself "
            f"for calibrated confidences)" if fmt == "safetensors" else
            f" divided by the calibration temperature {p.temperature:.6g} (softmax: calibrated confidences)")
    return _uncalibrated_contract(p, fmt, preprocessing)


def _uncalibrated_contract(p: Predictor, fmt: str, preprocessing: bool) -> str:
    h, w = p.image_size
    colour = "RGB" if p.channels == 3 else ("grayscale" if p.channels == 1 else f"{p.channels} channels")
    if fmt == "safetensors":
        steps = ", ".join(repr(t) for t in p.transforms) or "none"
        return (f"the network's weights; it takes float32 [B, {p.channels}, {h}, {w}] images in [0, 1] ({colour}) "
                f"after the run's eval transforms ({steps}); logits [B, {len(p.classes)}]")
    if preprocessing:
        how = ("stretched to" if p.fit == "stretch" else "resized to cover, then the centre cut at")
        return (f"images: uint8 [B, {p.channels}, H, W] ({colour}, upright), any H and W; {how} {h}x{w} "
                f"(bilinear, antialiased, as cnnreg predict), then the eval transforms; logits [B, {len(p.classes)}]")
    return (f"images: float32 [B, {p.channels}, {h}, {w}] in [0, 1] ({colour}); the eval transforms are "
            f"inside; logits [B, {len(p.classes)}]")


def _metadata(p: Predictor, inputs: str, preprocessing: bool) -> dict[str, str]:
    return {"classes": json.dumps(list(p.classes)), "inputs": inputs, "image_size": json.dumps(list(p.image_size)),
            "channels": str(p.channels), "fit": p.fit, "preprocessing": json.dumps(preprocessing),
            "temperature": json.dumps(p.temperature), "cnnreg": version()}


# -- checks -------------------------------------------------------------------------------------


def _difference(actual: torch.Tensor, expected: torch.Tensor, fmt: str, path: Path, tolerance: float,
                against: str = "the model") -> float:
    error = float((actual.float() - expected.float()).abs().max())
    if not error <= tolerance * max(1.0, float(expected.abs().max())):
        raise UserError(f"the {fmt} export at {path} gives different outputs from {against} (max abs diff "
                        f"{error:.3g}); the model may use an operation the exporter does not support")
    return error


def _as_predict_does(p: Predictor, module: _Exportable, images: torch.Tensor) -> torch.Tensor:
    """The logits of images resized by predict's own function, not the graph's replica."""
    from cnnreg.inputs.imagefiles import fit_image

    fitted = torch.stack([fit_image(image, p.image_size, p.fit) for image in images])  # type: ignore[arg-type]
    plain = _Exportable(module.model, tuple(module.transforms), temperature=module.temperature).eval()
    return plain(fitted.float().div(255))


# -- the formats ---------------------------------------------------------------------------------


def _refuse_deprecated_torchscript() -> None:
    """Refuse TorchScript where the installed torch deprecates it.

    Decided by what torch does, not by its version number: a tiny trace
    whose warnings are caught. torch 2.14 says "`torch.jit.trace` is
    deprecated. Please switch to `torch.compile` or `torch.export`"
    (FutureWarning) for trace, save and load alike.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(torch.nn.Linear(1, 1), torch.zeros(1, 1))
    said = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    if said:
        raise UserError(f"TorchScript is deprecated by the installed torch {torch.__version__} ({said[0]}); "
                        "export with --format pt2 instead (torch.export: load it with "
                        "torch.export.load(path).module()), or --format onnx")


def _reload_safetensors(module: _Exportable, path: Path) -> _Exportable:
    clone = copy.deepcopy(module)
    for parameter in clone.model.parameters():
        parameter.data.zero_()
    checkpoint.load_weights(clone.model, path)
    return clone


def _dynamic(preprocessing: bool) -> dict[int, Any]:
    """The batch is dynamic; with preprocessing the height and width too."""
    dims = {0: torch.export.Dim("batch")}
    if preprocessing:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    return dims


def _pt2(module: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
         preprocessing: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    program = torch.export.export(module, (example,), dynamic_shapes=(_dynamic(preprocessing),))
    extra = {"cnnreg.json": json.dumps(metadata)}

    def write(tmp: Path) -> None:
        # Through a buffer: torch.export.save logs a warning for a file not named *.pt2 (the temporary).
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files=extra)
        tmp.write_bytes(buffer.getvalue())

    checkpoint.atomic_write(path, write)
    with open(path, "rb") as handle:
        return torch.export.load(handle).module()


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
          preprocessing: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'cnnreg-framework[onnx]'") from None

    def write(tmp: Path) -> None:
        # torch.export-based exporter: the legacy one cannot export adaptive
        # pooling to a size that does not divide the input (the tutorial models
        # at other input sizes).
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=(_dynamic(preprocessing),))
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, str(tmp))

    checkpoint.atomic_write(path, write)
    onnx.checker.check_model(str(path))
    try:
        import onnxruntime  # type: ignore[import-not-found]
    except ImportError:  # onnx's own reference evaluator: slower, but checks the same graph
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        return lambda x: torch.from_numpy(evaluator.run(None, {"images": x.numpy()})[0])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
