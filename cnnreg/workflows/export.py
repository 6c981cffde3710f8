"""Exporting a run's model, and proving the export computes the same thing."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnreg.core import checkpoint
from cnnreg.core.device import full_precision
from cnnreg.inputs.prepare import merge_views, view_weights
from cnnreg.workflows.predict import Predictor
from cnnreg.core.errors import UserError

SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}


def export(p: Predictor, fmt: str, output: Path | None, run_dir: Path, tolerance: float = 1e-4) -> tuple[Path, float]:
    """Write the model (with its eval transforms in front, so the file takes
    [B, C, H, W] floats in [0, 1]) and check it against the original on a batch.

    :returns: the file written and the largest absolute difference of logits.
    :raises UserError: when the export fails or its outputs differ.
    """
    if fmt not in SUFFIX:
        raise UserError(f"unknown export format {fmt!r}; use onnx, torchscript or safetensors")
    path = Path(output) if output is not None else Path(run_dir) / f"model{SUFFIX[fmt]}"
    module = _Exportable(full_precision(checkpoint.unwrap(p.model)).cpu().eval(), p.transforms).eval()
    example = torch.rand(4, p.channels, *p.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(example)
    try:
        if fmt == "safetensors":
            checkpoint.save_weights(module.model, path)
            reloaded = _reload_safetensors(module, path)
        elif fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            checkpoint.atomic_write(path, lambda tmp: traced.save(str(tmp)))
            reloaded = torch.jit.load(str(path))
        else:
            reloaded = _onnx(module, example, path)
        with torch.no_grad():
            actual = reloaded(example)
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many types; the user needs the reason, not the stack
        raise UserError(f"exporting to {fmt} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    error = float((torch.as_tensor(actual) - expected).abs().max())
    if not error <= tolerance * max(1.0, float(expected.abs().max())):
        raise UserError(f"the {fmt} export at {path} gives different outputs (max abs diff {error:.3g}); "
                        "the model may use an operation the exporter does not support")
    return path, error


class _Exportable(torch.nn.Module):
    """The eval transforms and the model as one module, for exporting."""

    def __init__(self, model: torch.nn.Module, transforms: tuple):
        super().__init__()
        self.model = model
        self.transforms = list(transforms)
        self.views = view_weights(self.transforms)  # test-time augmentation: one merged answer per image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return merge_views(self.model(x), self.views)


def _reload_safetensors(module: _Exportable, path: Path) -> _Exportable:
    import copy

    clone = copy.deepcopy(module)
    for parameter in clone.model.parameters():
        parameter.data.zero_()
    checkpoint.load_weights(clone.model, path)
    return clone


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path):
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'cnnreg-framework[onnx]'") from None

    def write(tmp: Path) -> None:
        # torch.export-based exporter: the legacy one cannot export adaptive
        # pooling to a size that does not divide the input (the tutorial models
        # at other input sizes).
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(tmp))

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
