"""Each script in examples/ runs as a user would run it, on a small part of the bundled photos."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sktransfer" / "data" / "trash_sample"
ACCURACY = r"(0\.\d{3}|1\.000)"


def run_example(name, *args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), str(SAMPLE), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_pipeline_example(tmp_path):
    out = run_example("pipeline.py", "--per-class", "6", tmp_path=tmp_path)
    assert "27 training images, 9 test images" in out
    assert re.search(rf"test accuracy: {ACCURACY}\n", out)
    assert len(re.findall(r"^  \w+/\S+\.jpg -> (cardboard|glass|metal|paper|plastic|trash)$", out, re.M)) == 3


@pytest.mark.slow
def test_grid_search_example_embeds_each_image_once(tmp_path):
    out = run_example("grid_search.py", "--per-class", "4", "--max-epochs", "5",
                      "--cache-dir", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert "24 images, 4 candidates x 3 folds" in out
    assert "features in the memory cache: 24 (one per image)" in out
    assert re.search(rf"best cross-validated accuracy: {ACCURACY} with {{", out)
    assert len(list((tmp_path / "cache").rglob("*.f32"))) == 24


@pytest.mark.slow
def test_images_and_tabular_example(tmp_path):
    out = run_example("images_and_tabular.py", "--per-class", "6", tmp_path=tmp_path)
    assert "path  kilobytes orientation" in out
    assert re.search(rf"36 rows; 3-fold cross-validated accuracy: {ACCURACY} ± ", out)
    assert re.search(rf"the same without the image column: {ACCURACY}\n", out)


@pytest.mark.slow
def test_dask_example_runs_on_a_local_cluster(tmp_path):
    out = run_example("dask_run.py", "--per-class", "4", "--max-epochs", "5",
                      "--cache-dir", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert "Dask cluster with 2 workers" in out
    assert re.search(rf"24 images; best cross-validated accuracy {ACCURACY} with {{'dropout'", out)
    assert re.search(r"refit model predicts: \['\w+', '\w+', '\w+'\]", out)


def run_on(name, folder, *args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), str(folder), *args],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_regression_example(tmp_path):
    out = run_on("regression.py", dataset("sign_digits"), "--per-class", "6",
                 tmp_path=tmp_path)
    assert re.search(r"R² on held-out photos: -?\d+\.\d{3}\n", out)
    assert re.search(r"true \d, predicted -?\d+\.\d", out)


@pytest.mark.slow
def test_multilabel_example(tmp_path):
    out = run_on("multilabel.py", dataset("flowers5"), "--per-class", "8", tmp_path=tmp_path)
    assert re.search(rf"samples-averaged F1: {ACCURACY}\n", out)
    assert "precision" in out  # classification_report on the indicator matrix


@pytest.mark.slow
def test_incremental_example(tmp_path):
    out = run_on("incremental.py", SAMPLE, "--per-class", "8", tmp_path=tmp_path)
    assert re.search(rf"pass 1: \d+ epochs, held-out accuracy {ACCURACY}\n", out)
    assert re.search(rf"warm start: \d+ epochs, held-out accuracy {ACCURACY}\n", out)


@pytest.mark.slow
def test_onnx_deploy_example(tmp_path):
    out = run_example("onnx_deploy.py", "--per-class", "8", tmp_path=tmp_path)
    assert re.search(r"36 training photos; exported to model\.onnx \(\d+\.\d MB\)", out)
    assert re.search(rf"onnxruntime on 12 held-out photos: accuracy {ACCURACY}, same predictions as the "
                     r"estimator: True, largest probability difference \d\.\de-\d\d", out)
    assert len(re.findall(r"^  \w+/\S+\.jpg -> (cardboard|glass|metal|paper|plastic|trash) \(\d\.\d\d\)$",
                          out, re.M)) == 3
    assert (tmp_path / "model.onnx").stat().st_size > 1e6
