"""Calibration: ECE and temperature scaling checked against computations that are not ours.

ECE and classwise ECE against torchmetrics (``multiclass_calibration_error``,
and ``binary_calibration_error`` per class), on probabilities we give it, so
both see the same numbers; the fitted temperature against a brute-force grid
of ``F.cross_entropy`` and against a temperature planted in the data. Then
the command on a tiny trained run: the file it writes, and what evaluate,
predict and export make of it, each compared with the model's own logits.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cnnreg
from cnnreg.cli import main
from cnnreg.core.errors import UserError
from cnnreg.engine.outputs import collect_outputs
from cnnreg.workflows import calibration as cal
from cnnreg.workflows.calibrate import calibrate_run, read_temperature

from conftest import tiny_recipe

tm = pytest.importorskip("torchmetrics.functional.classification")

BINS = 15
EDGES32 = torch.linspace(0, 1, BINS + 1)  # torchmetrics' own bin edges (float32)


def _probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Probabilities as torchmetrics is given them: softmax in float64, rounded to float32.

    (Given logits, torchmetrics would take values inside [0, 1] for probabilities.)
    """
    return torch.softmax(logits.double() / temperature, dim=1).float()


def _tm_ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(tm.multiclass_calibration_error(_probs(logits, temperature), targets, num_classes=logits.shape[1],
                                                 n_bins=BINS, norm="l1"))


def _tm_classwise(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    probs = _probs(logits, temperature)
    per_class = [float(tm.binary_calibration_error(probs[:, k].contiguous(), (targets == k).long(), n_bins=BINS,
                                                   norm="l1"))
                 for k in range(logits.shape[1])]
    return sum(per_class) / len(per_class)


def _random(n: int, classes: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * scale, torch.randint(0, classes, (n,), generator=g)


def _ties(rows: list[tuple[int, int]], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with ``m`` tied top logits (the rest so low their probability is exactly 0), and a target each.

    Their top confidence is exactly 1/m: on a bin edge for m = 1 (1.0), 3 (5/15) and 15 (1/15).
    """
    logits = torch.full((len(rows), classes), -1e4)
    for i, (m, _) in enumerate(rows):
        logits[i, :m] = 0.0
    return logits, torch.tensor([t for _, t in rows])


def _on_an_edge(logits: torch.Tensor) -> int:
    confidence = _probs(logits).max(dim=1).values
    return int((confidence[:, None] == EDGES32).any(dim=1).sum())


# -- ECE and classwise ECE against torchmetrics -------------------------------------------------


@pytest.mark.parametrize("n, classes, scale, seed", [(500, 3, 3.0, 0), (2000, 10, 5.0, 1), (300, 2, 50.0, 2),
                                                     (64, 100, 1.0, 3), (1000, 4, 0.1, 4)])
def test_ece_and_classwise_ece_agree_with_torchmetrics_on_random_logits(n, classes, scale, seed):
    logits, targets = _random(n, classes, scale, seed)
    assert cal.expected_calibration_error(logits, targets) == pytest.approx(_tm_ece(logits, targets), abs=1e-6)
    assert cal.classwise_calibration_error(logits, targets) == pytest.approx(_tm_classwise(logits, targets), abs=1e-6)
    for t in (0.5, 2.0):
        assert cal.expected_calibration_error(logits, targets, temperature=t) == pytest.approx(
            _tm_ece(logits, targets, t), abs=1e-6)
        assert cal.classwise_calibration_error(logits, targets, temperature=t) == pytest.approx(
            _tm_classwise(logits, targets, t), abs=1e-6)


def test_confidences_exactly_on_bin_edges_count_where_torchmetrics_counts_them():
    # 1/15 and 1/3 on edges, 1.0 (a saturated softmax) right and wrong, probabilities of exactly 0, 1/5 beside one
    rows = [(15, 0), (15, 3), (3, 0), (3, 2), (3, 7), (1, 0), (1, 0), (1, 4), (5, 1), (5, 9)] * 7
    logits, targets = _ties(rows, classes=15)
    more, more_targets = _random(40, 15, 2.0, seed=5)
    sure = torch.full((10, 15), -1e4)
    sure[:, 0], sure[:, 1] = 3.5, 0.0  # confidence 0.97, right: in the last bin, under-confident
    logits = torch.cat([logits, more, sure])
    targets = torch.cat([targets, more_targets, torch.zeros(10, dtype=torch.long)])
    assert _on_an_edge(logits) >= 6 * 7  # the case is really there
    ece = cal.expected_calibration_error(logits, targets)
    assert ece == pytest.approx(_tm_ece(logits, targets), abs=1e-6)
    assert cal.classwise_calibration_error(logits, targets) == pytest.approx(_tm_classwise(logits, targets), abs=1e-6)
    # Confidence-1.0 samples are a bin of their own, as in torchmetrics; merged into the last bin
    # (a wrong one among them offsetting the under-confident rest) the error would be smaller.
    merged = sum(b.count * abs(b.accuracy - b.confidence) for b in cal.reliability_bins(logits, targets)) / len(targets)
    assert merged < ece


def test_all_correct_and_a_single_class_agree_with_torchmetrics():
    logits, _ = _random(400, 5, 3.0, seed=6)
    right = logits.argmax(dim=1)
    assert cal.expected_calibration_error(logits, right) == pytest.approx(_tm_ece(logits, right), abs=1e-6)
    # all right: the ECE is the mean under-confidence
    assert cal.expected_calibration_error(logits, right) == pytest.approx(
        float(1 - _probs(logits).max(dim=1).values.double().mean()), abs=1e-6)
    assert cal.classwise_calibration_error(logits, right) == pytest.approx(_tm_classwise(logits, right), abs=1e-6)
    one = torch.full((400,), 2)  # every image of class 2: the other classes' columns are all negatives
    assert cal.expected_calibration_error(logits, one) == pytest.approx(_tm_ece(logits, one), abs=1e-6)
    assert cal.classwise_calibration_error(logits, one) == pytest.approx(_tm_classwise(logits, one), abs=1e-6)
    # saturated and right: perfectly calibrated
    sure = torch.zeros(10, 3)
    sure[:, 1] = 100.0
    assert cal.expected_calibration_error(sure, torch.ones(10, dtype=torch.long)) == 0.0
    assert cal.expected_calibration_error(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long)) == 0.0  # one class


def test_reliability_bins_are_what_the_ece_sums():
    logits, targets = _random(1000, 10, 2.0, seed=7)
    bins = cal.reliability_bins(logits, targets)
    assert len(bins) == BINS and sum(b.count for b in bins) == 1000
    assert [b.low for b in bins] == pytest.approx([k / BINS for k in range(BINS)])
    gap = sum(b.count * abs(b.accuracy - b.confidence) for b in bins) / 1000
    assert gap == pytest.approx(cal.expected_calibration_error(logits, targets), abs=1e-12)
    confidence = _probs(logits).max(dim=1).values.double()
    for b in bins:
        chosen = (confidence >= b.low) & (confidence < b.high)
        assert b.count == int(chosen.sum())


def test_bad_arguments_are_said():
    logits, targets = _random(10, 3, 1.0, seed=8)
    with pytest.raises(ValueError, match="positive"):
        cal.expected_calibration_error(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match=r"need logits \[N, C\]"):
        cal.fit_temperature(logits, targets[:5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        cal.fit_temperature(torch.full((4, 3), float("nan")), targets[:4])


# -- the temperature against a grid and against a planted one -------------------------------------


def _grid_minimum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """The T of least NLL on a fine log grid (F.cross_entropy, not the module), its NLL, and the grid's ratio."""
    grid = torch.logspace(-1, 1, 4001, dtype=torch.float64)
    x = logits.double()
    nll = torch.stack([F.cross_entropy(x / t, targets) for t in grid])
    best = int(nll.argmin())
    return float(grid[best]), float(nll[best]), float(grid[1] / grid[0])


@pytest.mark.parametrize("n, classes, scale, seed", [(2000, 10, 4.0, 10), (500, 3, 0.7, 11), (3000, 5, 8.0, 12)])
def test_the_fitted_temperature_is_the_minimum_of_a_brute_force_grid(n, classes, scale, seed):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, classes, generator=g) * 1.5
    targets = torch.multinomial(torch.softmax(truth, dim=1), 1, generator=g)[:, 0]
    logits = truth + torch.randn(n, classes, generator=g) * scale / 3  # noise: over-confident or not
    t = cal.fit_temperature(logits, targets)
    grid_t, grid_nll, ratio = _grid_minimum(logits, targets)
    assert grid_t / ratio ** 2 <= t <= grid_t * ratio ** 2
    assert float(F.cross_entropy(logits.double() / t, targets)) <= grid_nll + 1e-12
    assert cal.negative_log_likelihood(logits, targets, t) == pytest.approx(
        float(F.cross_entropy(logits.double() / t, targets)), rel=1e-12)


@pytest.mark.parametrize("k", [0.5, 2.5])
def test_a_planted_temperature_is_recovered(k):
    # Labels drawn from softmax(truth); the model reports truth * k: the temperature that undoes it is k.
    g = torch.Generator().manual_seed(20)
    truth = torch.randn(20000, 10, generator=g) * 2
    targets = torch.multinomial(torch.softmax(truth, dim=1), 1, generator=g)[:, 0]
    t = cal.fit_temperature(truth * k, targets)
    assert t == pytest.approx(k, rel=0.03)
    after = cal.expected_calibration_error(truth * k, targets, temperature=t)
    assert after < cal.expected_calibration_error(truth * k, targets)
    assert after == pytest.approx(_tm_ece(truth * k, targets, t), abs=1e-6)


def test_separable_samples_get_the_smallest_temperature_allowed():
    logits = torch.zeros(10, 3)
    logits[:, 0] = 10.0
    assert cal.fit_temperature(logits, torch.zeros(10, dtype=torch.long)) == cal.MIN_T


# -- the command on a tiny trained run ----------------------------------------------------------


def _train(tmp_path: Path, **changes) -> Path:
    changes = {"trainer__epochs": 3, "callbacks": [{"name": "checkpoint"}], "disable_plugins": ["plots"], **changes}
    recipe = tiny_recipe(tmp_path, **changes)
    run = cnnreg.build(cnnreg.load_recipe(recipe))
    cnnreg.fit(run)
    return run.run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished run with a validation split (48 images), not yet calibrated."""
    return _train(tmp_path_factory.mktemp("calibrate"))


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of ``trained``, calibrated through the command line; and what --json printed."""
    run_dir = tmp_path_factory.mktemp("calibrated") / trained.name
    shutil.copytree(trained, run_dir)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["calibrate", str(run_dir), "--json"]) == 0
    return run_dir, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def raw_val(trained) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = collect_outputs(cnnreg.load_run(trained), "val")
    return outputs.logits, outputs.targets


def test_calibrate_writes_the_temperature_fitted_on_the_val_logits(calibrated, raw_val):
    run_dir, printed = calibrated
    data = json.loads((run_dir / "calibration.json").read_text())
    for key in ("temperature", "split", "samples", "checkpoint", "bins", "ece_before", "ece_after",
                "classwise_ece_before", "classwise_ece_after", "nll_before", "nll_after"):
        assert key in data and data[key] == printed[key], key
    logits, targets = raw_val
    assert data["split"] == "val" and data["samples"] == len(targets) == 48 and data["bins"] == 15
    assert data["checkpoint"] == "best"
    assert data["temperature"] == pytest.approx(cal.fit_temperature(logits, targets), rel=1e-9)
    t = data["temperature"]
    assert data["ece_before"] == pytest.approx(_tm_ece(logits, targets), abs=1e-6)
    assert data["ece_after"] == pytest.approx(_tm_ece(logits, targets, t), abs=1e-6)
    assert data["classwise_ece_after"] == pytest.approx(_tm_classwise(logits, targets, t), abs=1e-6)
    assert data["nll_before"] == pytest.approx(float(F.cross_entropy(logits.double(), targets)), rel=1e-9)
    assert data["nll_after"] == pytest.approx(float(F.cross_entropy(logits.double() / t, targets)), rel=1e-9)
    assert data["nll_after"] <= data["nll_before"] + 1e-12
    assert read_temperature(run_dir) == t and read_temperature(run_dir.parent) is None
    assert not list(run_dir.glob(".*.tmp"))  # the atomic write left no temporary behind


def test_calibrating_again_fits_the_model_not_the_calibrated_logits(calibrated, capsys):
    run_dir, printed = calibrated
    capsys.readouterr()
    assert main(["calibrate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"temperature {printed['temperature']:.4g}" in out
    for word in ("ECE", "classwise ECE", "NLL", "before", "after", "calibration.json"):
        assert word in out


def test_evaluate_applies_the_temperature_and_says_so(calibrated, trained, capsys):
    run_dir, printed = calibrated
    t = printed["temperature"]
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    assert f"calibrated: temperature {t:.4g} ({run_dir / 'calibration.json'})" in capsys.readouterr().out
    assert main(["evaluate", str(run_dir), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["temperature"] == t and result["calibration"] == str(run_dir / "calibration.json")
    test = collect_outputs(cnnreg.load_run(trained), "test")
    assert result["metrics"]["loss"] == pytest.approx(float(F.cross_entropy(test.logits.double() / t, test.targets)),
                                                      rel=1e-5)
    raw = cnnreg.evaluate(cnnreg.load_run(run_dir, calibrated=False), "test")
    assert result["metrics"]["accuracy"] == raw.metrics["accuracy"]
    assert raw.metrics["loss"] == pytest.approx(float(F.cross_entropy(test.logits.double(), test.targets)), rel=1e-5)
    assert main(["evaluate", str(trained), "--split", "test"]) == 0
    assert "calibrated" not in capsys.readouterr().out  # an uncalibrated run says nothing of it


def _pngs(folder: Path, count: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (count, 12, 12, 3), dtype=np.uint8)
    paths = [folder / f"image-{i}.png" for i in range(count)]
    for path, image in zip(paths, pixels):
        Image.fromarray(image).save(path)
    return paths


def test_predict_gives_the_calibrated_confidences_and_says_so(calibrated, tmp_path, capsys):
    run_dir, printed = calibrated
    t = printed["temperature"]
    files = _pngs(tmp_path)
    raw = cnnreg.predict(cnnreg.load_predictor(run_dir, calibrated=False), files, top_k=3)
    capsys.readouterr()
    assert main(["predict", str(run_dir), *map(str, files), "--top-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, plain in zip(lines, raw):
        # the model's own logits, up to a constant per image, are log(softmax): softmax(log p / T) is the answer
        logits = torch.log(torch.tensor(plain.confidences, dtype=torch.float64))
        expected = dict(zip(plain.classes, torch.softmax(logits / t, dim=0).tolist()))
        assert dict(zip(line["classes"], line["confidences"])) == pytest.approx(expected, abs=2e-5)
        assert line["temperature"] == t and line["calibration"] == str(run_dir / "calibration.json")
    assert main(["predict", str(run_dir), str(files[0])]) == 0
    assert f"calibrated: temperature {t:.4g}" in capsys.readouterr().out


def _reference_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """The uncalibrated model's logits on [0, 1] images, by its transforms and network, without export's code."""
    p = cnnreg.load_predictor(run_dir, device="cpu", calibrated=False)
    p.model.float().eval()
    with torch.no_grad():
        for transform in p.transforms:
            x = transform(x)
        return p.model(x.contiguous())


def _export(run_dir: Path, fmt: str, output: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", fmt, "-o", str(output), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_pt2_export_outputs_the_logits_divided_by_the_temperature(calibrated, tmp_path, capsys):
    run_dir, printed = calibrated
    t = printed["temperature"]
    done = _export(run_dir, "pt2", tmp_path / "model.pt2", capsys)
    assert done["temperature"] == t and json.loads(done["metadata"]["temperature"]) == t
    extra = {"cnnreg.json": ""}
    program = torch.export.load(str(tmp_path / "model.pt2"), extra_files=extra)
    assert json.loads(json.loads(extra["cnnreg.json"])["temperature"]) == t
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = program.module()(x)
    torch.testing.assert_close(actual, _reference_logits(run_dir, x) / t, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "pt2", "-o", str(tmp_path / "again.pt2")]) == 0
    assert f"calibrated: temperature {t:.4g}" in capsys.readouterr().out


def test_an_onnx_export_outputs_the_logits_divided_by_the_temperature(calibrated, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    run_dir, printed = calibrated
    t = printed["temperature"]
    done = _export(run_dir, "onnx", tmp_path / "model.onnx", capsys)
    props = {p.key: p.value for p in onnx.load(done["path"]).metadata_props}
    assert json.loads(props["temperature"]) == t and f"temperature {t:.6g}" in props["inputs"]
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    from onnx.reference import ReferenceEvaluator

    actual = torch.from_numpy(ReferenceEvaluator(done["path"]).run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(actual, _reference_logits(run_dir, x) / t, atol=1e-4, rtol=1e-4)


def test_a_safetensors_export_records_the_temperature(calibrated, tmp_path, capsys):
    from safetensors import safe_open

    run_dir, printed = calibrated
    done = _export(run_dir, "safetensors", tmp_path / "model.safetensors", capsys)
    with safe_open(done["path"], framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["temperature"]) == printed["temperature"] and "divide them by it" in meta["inputs"]


def test_an_uncalibrated_export_says_temperature_null(trained, tmp_path, capsys):
    done = _export(trained, "safetensors", tmp_path / "plain.safetensors", capsys)
    assert done["temperature"] is None and done["metadata"]["temperature"] == "null"


# -- what goes wrong ------------------------------------------------------------------------------


def test_a_run_without_a_validation_split_is_refused_and_told_how_to_get_one(tmp_path, capsys):
    run_dir = _train(tmp_path, data__val_size=0, data__val_fraction=0, trainer__epochs=1)
    capsys.readouterr()
    assert main(["calibrate", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for words in ("no validation split", "held-out data that is not the test split", "data.val_fraction > 0"):
        assert words in " ".join(err.split()), err
    assert not (run_dir / "calibration.json").exists()


def test_a_damaged_calibration_file_is_located_and_calibrate_repairs_it(trained, tmp_path, capsys):
    run_dir = tmp_path / trained.name
    shutil.copytree(trained, run_dir)
    path = run_dir / "calibration.json"
    for damage in ('{"temperature": 1.', '{"temperature": -2}', '[1, 2]'):
        path.write_text(damage)
        capsys.readouterr()
        assert main(["predict", str(run_dir), str(_pngs(tmp_path / "images", 1)[0])]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{path} is damaged" in err and f"cnnreg calibrate {run_dir}" in err and "Traceback" not in err
        with pytest.raises(UserError, match="is damaged"):
            read_temperature(run_dir)
    assert main(["evaluate", str(run_dir)]) == 2
    assert f"{path} is damaged" in capsys.readouterr().err
    assert main(["calibrate", str(run_dir)]) == 0  # the fix the message gives works
    assert read_temperature(run_dir) > 0


def test_an_unwritable_run_directory_is_named_before_any_work(trained, tmp_path, monkeypatch):
    from cnnreg.runs import calibration_file

    run_dir = tmp_path / trained.name
    shutil.copytree(trained, run_dir)
    monkeypatch.setattr(calibration_file.os, "access", lambda *a, **k: False)  # as for a user without write access
    monkeypatch.setattr("cnnreg.workflows.calibrate.load_run", lambda *a, **k: pytest.fail("worked first"))
    with pytest.raises(UserError, match=re.escape(f"cannot write calibration.json into the run directory: {run_dir} "
                                                  "is not writable")):
        calibrate_run(run_dir)
    monkeypatch.undo()
    (run_dir / "calibration.json").mkdir()  # the rename fails: said with the file's path
    with pytest.raises(UserError, match=re.escape(f"could not write {run_dir / 'calibration.json'}")):
        calibrate_run(run_dir)


def test_the_test_split_is_refused(trained):
    with pytest.raises(UserError, match="not fitted on the test split"):
        calibrate_run(trained, split="test")
