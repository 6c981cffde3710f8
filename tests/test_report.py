"""The run report (cnnreg report, the report callback): one self-contained report.html.

A real browser loads it (headless Chromium through selenium and Debian's
chromedriver) and every image must decode with no console error; where no
Chromium is installed that test is skipped, and an HTML parser still checks
the structure. Every run type the issue names trains here for a second or
two on tiny real-format data.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import cnnreg
from cnnreg.core.errors import UserError
from cnnreg.workflows.gradcam import grad_cam, last_spatial_conv
from cnnreg.workflows.report import write_report

from _datafiles import write_mnist
from conftest import cli, tiny_recipe

HEADINGS = ["Summary", "Environment", "Training curves", "Confusion matrix", "Per-class results",
            "Most confused pairs", "Highest-loss images", "Grad-CAM", "Calibration"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMEDRIVER = shutil.which("chromedriver")


class Page(HTMLParser):
    """What a check of the structure needs: headings, images, links, scripts, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.scripts = 0
        self.text: list[str] = []
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        if tag in ("h1", "h2", "h3"):
            self._in = tag
            self.headings.append("")
        for name in ("src", "href"):
            if attrs.get(name):
                self.urls.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in == "h2":
            self.headings[-1] += data

    @property
    def sections(self) -> list[str]:
        return [h for h in self.headings if h in HEADINGS]

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def train(recipe: dict) -> Path:
    result = cnnreg.fit(cnnreg.build(cnnreg.load_recipe(recipe)))
    assert result.run_dir is not None
    return result.run_dir


def check_structure(path: Path) -> Page:
    """Headings, every image an inline PNG that decodes, nothing fetched from elsewhere, no script."""
    from PIL import Image

    page = Page(path.read_text(encoding="utf-8"))
    assert page.sections == HEADINGS, page.headings
    assert page.images, "the report shows no image"
    for image in page.images:
        src = image["src"]
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            assert decoded.width > 0 and decoded.height > 0
    for url in page.urls:
        assert url.startswith(("#", "data:")) or ("://" not in url and not url.startswith("//")), url
    assert page.scripts == 0
    return page


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-epoch tiny run whose recipe asks for the report (and keeps best weights)."""
    root = tmp_path_factory.mktemp("report")
    recipe = tiny_recipe(root, callbacks=[{"name": "checkpoint"}, {"name": "report", "top_losses": 8}])
    return train(recipe)


def test_the_callback_writes_the_report_at_fit_end(tiny_run):
    path = tiny_run / "report.html"
    assert path.is_file()
    page = check_structure(path)
    text = page.all_text
    assert "Run report: tiny" in text
    assert "48 images" in text  # the test split
    assert "fitted on the validation split for this report only" in text
    assert text.count("loss ") >= 8  # the gallery's captions
    assert not (tiny_run / "calibration.json").exists()  # the report stores nothing


def test_the_report_is_self_contained_and_well_formed(tiny_run, tmp_path):
    copy = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (copy / "report.html").unlink()
    path = write_report(copy, top_losses=5)
    assert path == copy / "report.html"
    page = check_structure(path)
    tiles = [i for i in page.images if i.get("class") == "tile"]
    assert len(tiles) >= 5
    assert "sorted by F1" not in page.all_text  # 3 classes: the table keeps the class order
    assert any("confusion matrix" in i.get("alt", "") for i in page.images)


def test_in_headless_chromium_every_image_decodes_with_no_console_error(tiny_run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium chromium-driver); "
                    "the HTML-parser test checks the structure")
    if CHROMEDRIVER is None:
        pytest.skip("chromium is installed but not chromedriver (Debian: apt-get install chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No network on the test machines: nothing that phones home, a fresh profile, no GPU.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((tiny_run / "report.html").as_uri())
        widths = driver.execute_script(
            "return [...document.images].map(i => i.complete ? i.naturalWidth : -1)")
        headings = driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent)")
        errors = [entry for entry in driver.get_log("browser") if entry.get("level") in ("SEVERE", "ERROR")]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height), 12000))
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    print(f"screenshot: {screenshot}")
    assert widths and all(w > 0 for w in widths), widths
    assert headings == HEADINGS
    assert not errors, errors
    assert screenshot.stat().st_size > 10_000


def test_a_stored_temperature_is_shown_before_and_after(tiny_run, tmp_path):
    copy = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (copy / "calibration.json").write_text(json.dumps({"temperature": 1.5, "split": "val"}))
    text = check_structure(write_report(copy)).all_text
    assert "Temperature from calibration.json" in text
    assert "T = 1.500" in text


def test_a_run_without_a_validation_split_says_why_calibration_is_absent(tmp_path):
    recipe = tiny_recipe(tmp_path, data__val_size=0, data__val_fraction=0.0, trainer__epochs=1)
    page = check_structure(write_report(train(recipe)))
    assert "this run has no validation split" in page.all_text
    assert "T = " not in page.all_text


def test_grayscale_images_are_shown_gray(tmp_path):
    from PIL import Image

    write_mnist(tmp_path / "data", train=60, test=20)
    recipe = tiny_recipe(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "batch_size": 16,
                                         "val_fraction": 0.25},
                         model={"name": "simple_cnn", "widths": [4, 4, 4]}, trainer__epochs=1)
    page = check_structure(write_report(train(recipe)))
    tile = next(i for i in page.images if i.get("class") == "tile")
    with Image.open(io.BytesIO(base64.b64decode(tile["src"].split(",", 1)[1]))) as image:
        assert image.mode == "L" and image.size == (140, 140)  # 28 px, 5x


def test_a_hundred_classes_get_the_top_confusions_not_a_matrix(tmp_path):
    recipe = tiny_recipe(tmp_path, data__num_classes=100, data__image_size=8, data__train_size=300,
                         data__val_size=100, data__test_size=100, trainer__epochs=1)
    page = check_structure(write_report(train(recipe)))
    text = page.all_text
    assert "100 classes: a 100x100 matrix would not be legible" in text
    assert not any("confusion matrix" in i.get("alt", "") for i in page.images)
    assert "sorted by F1 (worst first)" in text
    assert "The 20 largest off-diagonal cells" in text


def test_a_tta_run_reports_its_views(tmp_path):
    recipe = tiny_recipe(tmp_path, transforms={"train": [{"name": "normalize"}],
                                               "eval": [{"name": "normalize"}, {"name": "tta", "translate": 1}]},
                         trainer__epochs=1)
    text = check_structure(write_report(train(recipe))).all_text
    assert "6 views per image" in text
    assert "Maps of layer" in text  # Grad-CAM ran on the plain images


def test_a_transfer_run_at_224_px(tmp_path):
    """timm's tiny test_resnet, no pretrained weights (no network): 224 px images, Grad-CAM on its last stage."""
    recipe = tiny_recipe(tmp_path, data__image_size=224, data__train_size=16, data__val_size=8,
                         data__test_size=8, data__batch_size=8, model={"name": "timm", "arch": "test_resnet"},
                         trainer__epochs=1)
    page = check_structure(write_report(train(recipe), top_losses=4))
    assert "224x224" in page.all_text
    assert "Maps of layer" in page.all_text


def test_a_sweep_folder_gets_a_comparison_page(tmp_path):
    from cnnreg.workflows.sweep import run_sweep

    recipe = tiny_recipe(tmp_path, trainer__epochs=2, sweep={"parameters": {"optimizer.lr": [0.01, 0.001]}})
    sweep = run_sweep(recipe)
    page = Page(write_report(sweep.run_dir).read_text(encoding="utf-8"))
    assert "Ranked runs" in page.headings and "Training curves" in page.headings
    text = page.all_text
    assert "optimizer.lr" in text and "0.001" in text and "2 runs, best val_accuracy first" in text
    assert len(page.images) == 1 and page.images[0]["src"].startswith("data:image/png;base64,")


def test_a_k_fold_folder_gets_a_comparison_page_with_the_mean(tmp_path):
    recipe = tiny_recipe(tmp_path, trainer__epochs=1, cross_validation={"folds": 2})
    cv = cnnreg.cross_validate(cnnreg.load_recipe(recipe))
    page = Page(write_report(cv.run_dir).read_text(encoding="utf-8"))
    assert {"Ranked runs", "Mean over the folds", "Training curves"} <= set(page.headings)
    assert "fold-1" in page.all_text and "fold-2" in page.all_text


def test_cnnreg_run_prints_the_report_path_and_cnnreg_report_writes_one(tmp_path, recipe_file):
    recipe = tiny_recipe(tmp_path, trainer__epochs=1, callbacks=[{"name": "report", "top_losses": 4}])
    done = cli("run", str(recipe_file(recipe)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("report: "))
    path = Path(line.removeprefix("report: ").strip())
    assert path.is_file() and path.name == "report.html"
    path.unlink()
    again = cli("report", str(path.parent), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"report": str(path)}
    assert path.is_file()


def test_a_folder_that_is_not_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither a run directory"):
        write_report(tmp_path)


def test_without_matplotlib_the_report_says_what_to_install(tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then finds nothing
    with pytest.raises(UserError, match=r"pip install 'cnnreg-framework\[plots\]'"):
        write_report(tiny_run)


# -- Grad-CAM ------------------------------------------------------------------------------------


def _models():
    import timm

    from cnnreg_plugins.tutorial_models import simple_cnn

    torch.manual_seed(0)
    return [("simple_cnn", simple_cnn(num_classes=3, widths=[8, 8, 8]), 16),
            ("simple_cnn_bn", simple_cnn(num_classes=3, widths=[8, 8, 8], batch_norm=True), 16),
            ("test_resnet", timm.create_model("test_resnet", num_classes=4), 64),
            ("test_efficientnet", timm.create_model("test_efficientnet", num_classes=4), 64)]


@pytest.mark.parametrize("name", ["simple_cnn", "simple_cnn_bn", "test_resnet", "test_efficientnet"])
def test_grad_cam_matches_captum_layer_grad_cam(name):
    captum = pytest.importorskip("captum.attr", reason="captum is a test extra: the independent reference")
    _, model, size = next(m for m in _models() if m[0] == name)
    model.eval()
    x = torch.randn(4, 3, size, size)
    layer = last_spatial_conv(model, x[:1])
    targets = torch.tensor([0, 1, 2, 3]) % 3
    mine = grad_cam(model, layer, x, targets)
    reference = captum.LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
    reference = reference.detach().squeeze(1)
    assert mine.shape == reference.shape and mine.shape[-1] > 1
    assert torch.allclose(mine, reference, atol=1e-6 * max(1.0, float(reference.abs().max()))), name
    assert float(mine.max()) > 0


def test_the_grad_cam_layer_is_the_last_spatial_convolution_not_a_1x1_gate():
    _, model, size = next(m for m in _models() if m[0] == "test_efficientnet")
    model.eval()
    layer = last_spatial_conv(model, torch.randn(1, 3, size, size))
    # test_efficientnet's squeeze-and-excitation gates are convolutions on 1x1 maps; its head conv is spatial
    assert layer is model.conv_head
