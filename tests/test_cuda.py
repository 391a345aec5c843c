"""device="cuda": the whole job on a GPU, and its models on machines without one.

Skipped where torch sees no GPU (CI has none); run on a machine with one.
``SKTRANSFER_TEST_GPU`` names the device to test (default ``"cuda"``; e.g.
``"cuda:1"``). ``SKTRANSFER_TEST_GPU=cpu`` runs the same tests on the CPU,
which checks the tests themselves, not the GPU.

CUDA computes float32 convolutions in TF32 by default, so features from a GPU
agree with the CPU's within cosine similarity, not bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch

from sktransfer import (ImageEmbedder, PretrainedImageClassifier, explain, export_onnx, load_model,
                        save_model)
from sktransfer._cli import main
from sktransfer._engine import MIN_COSINE, MIN_COSINE_BF16

from conftest import OFFLINE, SAMPLE, fresh_env, subset

GPU = os.environ.get("SKTRANSFER_TEST_GPU", "cuda")


def _available(device):
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    return dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()


pytestmark = pytest.mark.skipif(not _available(GPU), reason=f"no {GPU} device here (SKTRANSFER_TEST_GPU)")

def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def split():
    """12 training and 6 held-out photos of each of the 6 bundled classes."""
    train = subset(SAMPLE, 12)
    test = subset(SAMPLE, 6, offset=12)
    return train, test


@pytest.fixture(scope="module")
def gpu_model(split):
    (X, y), _ = split
    return PretrainedImageClassifier(device=GPU, random_state=0).fit(X, y)


def _device_types(module):
    return {p.device.type for p in module.parameters()}


def test_features_on_the_gpu_match_the_cpu(split):
    (X, _), _ = split
    on_gpu = ImageEmbedder(device=GPU).fit_transform(X)
    on_cpu = ImageEmbedder(device="cpu", engine="torch").fit_transform(X)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    assert _cosines(on_gpu, on_cpu).min() >= MIN_COSINE


def test_bfloat16_on_the_gpu_runs_close_to_float32(split):
    (X, _), _ = split
    bf16 = ImageEmbedder(device=GPU, precision="bfloat16").fit_transform(X[:16])
    fp32 = ImageEmbedder(device=GPU, precision="float32").fit_transform(X[:16])
    assert bf16.dtype == np.float32
    # bfloat16 rounds every activation: close, not within MIN_COSINE.
    assert _cosines(bf16, fp32).min() >= MIN_COSINE_BF16


def test_gpu_and_cpu_features_are_cached_apart(split, tmp_path):
    (X, _), _ = split
    ImageEmbedder(device=GPU, cache_dir=tmp_path).fit_transform(X[:8])
    from_cache = ImageEmbedder(device="cpu", engine="torch", cache_dir=tmp_path).fit_transform(X[:8])
    fresh = ImageEmbedder(device="cpu", engine="torch").fit_transform(X[:8])
    np.testing.assert_array_equal(from_cache, fresh)


def test_classifier_trains_its_head_on_the_gpu(gpu_model, split):
    (X, y), (X_test, y_test) = split
    assert _device_types(gpu_model.head_.module_) == {torch.device(GPU).type}
    proba = gpu_model.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(gpu_model.predict(X_test)) == list(gpu_model.classes_[proba.argmax(axis=1)])
    cpu_model = PretrainedImageClassifier(device="cpu", engine="torch", random_state=0).fit(X, y)
    # The same photos and settings: accuracy as on the CPU (random guessing is 1/6).
    assert gpu_model.score(X_test, y_test) >= cpu_model.score(X_test, y_test) - 0.1
    assert gpu_model.score(X_test, y_test) > 0.5


def test_unfrozen_blocks_train_on_the_gpu(split):
    (X, y), (X_test, _) = split
    clf = PretrainedImageClassifier(device=GPU, unfreeze=1, max_epochs=3, random_state=0).fit(X, y)
    assert _device_types(clf.head_.module_) == {torch.device(GPU).type}
    assert clf.predict_proba(X_test).shape == (len(X_test), 6)


def test_seeded_augmented_fits_repeat_on_the_gpu(split):
    (X, y), (X_test, _) = split
    # Calibrated: the held-out photos are scored on their plain features, moved to the GPU too.
    fit = lambda: PretrainedImageClassifier(device=GPU, augment="light", n_views=2,  # noqa: E731
                                            calibration="temperature", validation_fraction=0.25,
                                            hidden_units=(64,), max_epochs=3, random_state=0).fit(X, y)
    first, second = fit(), fit()
    assert first.temperature_ == pytest.approx(second.temperature_, rel=1e-5)
    np.testing.assert_allclose(first.predict_proba(X_test), second.predict_proba(X_test), atol=1e-5)


def test_grad_cam_of_a_gpu_model(gpu_model, split):
    _, (X_test, _) = split
    overlays, heatmaps = explain(gpu_model, X_test[:2], return_heatmaps=True)
    assert len(overlays) == 2 and heatmaps.shape[0] == 2
    assert heatmaps.max() > 0


def test_gpu_model_loads_and_predicts_where_there_is_no_gpu(gpu_model, split, tmp_path):
    _, (X_test, _) = split
    joblib.dump(gpu_model, tmp_path / "model.joblib")
    code = OFFLINE + textwrap.dedent(f"""
        import json, warnings, joblib
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = joblib.load({str(tmp_path / "model.joblib")!r})
            proba = model.predict_proba({list(X_test)!r})
        print(json.dumps({{"proba": proba.tolist(), "warnings": [str(w.message) for w in caught]}}))
    """)
    env = {**fresh_env(), "CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU in this process
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    if torch.device(GPU).type == "cuda":
        assert any("CUDA is not available here; using the CPU" in w for w in out["warnings"]), out["warnings"]
    np.testing.assert_allclose(out["proba"], gpu_model.predict_proba(X_test), atol=0.02)


def test_save_model_of_a_gpu_model(gpu_model, split, tmp_path):
    _, (X_test, _) = split
    save_model(gpu_model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.device == "cpu"  # the device is a setting of one machine, not saved
    np.testing.assert_allclose(loaded.predict_proba(X_test), gpu_model.predict_proba(X_test), atol=0.02)


def test_onnx_export_of_a_gpu_model(gpu_model, split, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    _, (X_test, _) = split
    path = export_onnx(gpu_model, tmp_path / "model.onnx")
    prep = gpu_model.embedder_.backbone_.preprocessing
    images = np.stack([prep.to_array(Image.open(p).convert("RGB")) for p in X_test[:4]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (proba,) = session.run(["probabilities"], {"images": images})
    np.testing.assert_allclose(proba, gpu_model.predict_proba(X_test[:4]), atol=0.02)


def test_command_line_fit_on_the_gpu(tmp_path, split):
    (X, y), (X_test, _) = split
    data = tmp_path / "photos"
    for path, label in zip(X, y):
        (data / label).mkdir(parents=True, exist_ok=True)
        os.symlink(path, data / label / os.path.basename(path))
    model = tmp_path / "model.joblib"
    assert main(["fit", str(data), "--device", GPU, "--cv", "2", "-o", str(model)]) == 0
    assert main(["predict", str(model), *X_test[:3], "-o", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4
