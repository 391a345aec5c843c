"""Where the frozen body runs: engines and precisions, their agreement, fallbacks and pickles."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sktransfer import ImageEmbedder, PretrainedImageClassifier, cache_info, clear_cache
from sktransfer import _engine
from sktransfer._backbones import build_backbone
from sktransfer._engine import (
    MIN_COSINE, MIN_COSINE_BF16, OPENVINO_MIN_IMAGES, TORCH_FLOAT32, Plan, choose, cpu_has_bf16,
)

from conftest import ROOT, ForwardCounter, fresh_env

HAS_OPENVINO = _engine._openvino_core() is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO is not installed on this platform")


@pytest.fixture(scope="module", autouse=True)
def conversions_stay_in_this_module():
    """Once a body is converted, engine="auto" runs it in OpenVINO for the rest of the
    process: undo the conversions made here, so later tests see a fresh machine."""
    yield
    from sktransfer import _backbones

    for backbone in list(_backbones._BUILT.values()):
        backbone._handles.clear()
        backbone._prefixes.clear()
    folder = os.environ["SKTRANSFER_ENGINE_CACHE"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos(sample):
    return sample[0][::19]  # 8 real photos, every class


@pytest.fixture(scope="module")
def reference(photos):
    """float32 PyTorch: the features every other path is held to."""
    clear_cache()
    return ImageEmbedder(engine="torch", precision="float32").fit_transform(photos)


@pytest.mark.parametrize("engine,precision", [("torch", "bfloat16"), ("openvino", "float32"),
                                              ("openvino", "bfloat16")])
def test_every_path_keeps_features_within_tolerance_of_float32_torch(engine, precision, photos, reference):
    if engine == "openvino" and not HAS_OPENVINO:
        pytest.skip("OpenVINO is not installed on this platform")
    if precision == "bfloat16" and not cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16 (AMX or AVX-512 BF16): every engine computes float32 here")
    emb = ImageEmbedder(engine=engine, precision=precision).fit()
    assert emb.backbone_.plan(engine=engine, precision=precision) == Plan(engine, precision)
    clear_cache()
    with ForwardCounter(emb.backbone_.module) as torch_pass:
        features = emb.transform(photos)
    assert torch_pass.images == (len(features) if engine == "torch" else 0)  # the engine ran the body
    assert features.dtype == np.float32 and features.shape == reference.shape
    least = MIN_COSINE if precision == "float32" else MIN_COSINE_BF16
    assert cosine(features, reference).min() >= least


def test_auto_keeps_float32_on_a_cpu_with_native_bfloat16(monkeypatch):
    # OpenVINO's bfloat16 on an Intel Xeon with AMX kept real photos' features only within
    # cosine 0.9926 of float32 PyTorch (docs/benchmarks.md), below MIN_COSINE: "auto" may
    # not pick it. The CPU's answer is set here, so this holds on every machine.
    monkeypatch.setattr(_engine, "cpu_has_bf16", lambda: True)
    for converted in (False, True):
        plan = choose("auto", "auto", "cpu", "auto", n_images=10**6, converted=converted)
        assert plan.precision == "float32"
        assert choose("openvino", "auto", "cpu", "auto", n_images=10**6, converted=converted).precision == "float32"
    # Asked for, it runs.
    assert choose("openvino", "bfloat16", "cpu", "auto", n_images=1, converted=True).precision == "bfloat16"


@pytest.mark.parametrize("engine", ["torch", "openvino", "auto"])
def test_bfloat16_on_a_cpu_without_it_computes_float32_on_every_engine(engine, monkeypatch):
    # Emulated bfloat16 is no faster, far slower in PyTorch (about 11x here): asked for on such a
    # CPU, every engine computes float32 and says so, whichever engine "auto" picks.
    import warnings

    monkeypatch.setattr(_engine, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(_engine, "_WARNED", set())
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        for converted in (False, True):
            plan = choose(engine, "bfloat16", "cpu", "auto", n_images=1, converted=converted)
            assert plan.precision == "float32"
    assert len([w for w in told if "no native bfloat16" in str(w.message)]) == 1
    # A GPU computes it natively.
    assert choose("torch", "bfloat16", "cuda", "auto", n_images=1, converted=False) == Plan("torch", "bfloat16")


def test_the_engine_cache_folder_under_home_is_the_users_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", "~/engine")
    assert _engine.model_cache_folder() == str(tmp_path / "engine")


@needs_openvino
def test_converting_one_backbone_does_not_hold_up_another(monkeypatch):
    # A server predicting with one model while another model's body converts (seconds).
    import threading

    converting, release = threading.Event(), threading.Event()
    real_convert = _engine.convert

    def slow_convert(*args, **kwargs):
        converting.set()
        release.wait(60)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(_engine, "convert", slow_convert)
    slow = build_backbone("efficientnet_lite0", weights=None)
    busy = threading.Thread(target=slow.plan, kwargs=dict(engine="openvino", precision="float32"))
    busy.start()
    try:
        assert converting.wait(60)
        other = build_backbone("efficientnet_lite0")
        served = threading.Thread(target=lambda: other.runner(TORCH_FLOAT32, "cpu")(
            [np.zeros((224, 224, 3), np.uint8)]))
        served.start()
        served.join(30)
        assert not served.is_alive(), "the other backbone waited for this one's conversion"
    finally:
        release.set()
        busy.join(120)


@needs_openvino
def test_openvino_threads_are_not_pinned(photos, reference):
    emb = ImageEmbedder(engine="openvino", precision="float32").fit()
    plan = emb.backbone_.plan(engine="openvino", precision="float32")
    assert emb.backbone_.runner(plan, "cpu").compiled.get_property("ENABLE_CPU_PINNING") is False
    clear_cache()
    assert cosine(emb.transform(photos), reference).min() >= MIN_COSINE


def test_auto_picks_the_fastest_path_within_tolerance():
    big = choose("auto", "auto", "cpu", "auto", n_images=OPENVINO_MIN_IMAGES, converted=False)
    assert big == (Plan("openvino", "float32") if HAS_OPENVINO else Plan("torch", "float32"))
    # A small call does not pay a conversion, unless the body is converted already.
    # PyTorch stays at float32: its bfloat16 autocast is below MIN_COSINE.
    assert choose("auto", "auto", "cpu", "auto", n_images=1, converted=False) == Plan("torch", "float32")
    assert choose("auto", "auto", "cpu", "auto", n_images=1, converted=True) == big
    # torch.compile asked for, or a GPU: PyTorch.
    assert choose("auto", "auto", "cpu", True, n_images=10**6, converted=True).engine == "torch"
    assert choose("auto", "auto", "cuda", "auto", n_images=10**6, converted=True) == Plan("torch", "float32")
    assert choose("torch", "float32", "cpu", "auto", n_images=10**6, converted=True) == Plan("torch", "float32")


@needs_openvino
def test_native_bfloat16_agrees_with_what_openvino_reports():
    """/proc/cpuinfo's flags and OpenVINO's view of the CPU are two independent sources."""
    capabilities = _engine._openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert cpu_has_bf16() == ("BF16" in capabilities)


def test_settings_that_cannot_go_together_fail_at_fit():
    with pytest.raises(ValueError, match="compile=True.*engine='openvino'"):
        ImageEmbedder(engine="openvino", compile=True).fit()
    with pytest.raises(ValueError, match="engine"):
        ImageEmbedder(engine="tensorrt").fit()
    with pytest.raises(ValueError, match="precision"):
        ImageEmbedder(precision="float16").fit()
    with pytest.raises(ValueError, match="engine='openvino' runs on the CPU"):
        _engine.check_settings("openvino", "auto", "cuda", "auto")


@needs_openvino
def test_features_of_each_engine_are_cached_apart(tmp_path, photos):
    for engine in ("torch", "openvino"):
        clear_cache()
        ImageEmbedder(engine=engine, precision="float32", cache_dir=tmp_path).fit_transform(photos)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert cache_info(tmp_path)["entries"] == 2 * len(photos)


def test_features_computed_on_a_gpu_are_cached_apart_from_the_cpus():
    # CUDA runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), other
    # arithmetic than the CPU's float32: a cache shared by both must not mix their features.
    cpu = TORCH_FLOAT32.namespace("body", "cpu")
    assert cpu == "body"  # features cached by earlier releases on the CPU stay valid
    assert TORCH_FLOAT32.namespace("body", "cuda:0") == TORCH_FLOAT32.namespace("body", "cuda") != cpu
    assert Plan("openvino", "float32").namespace("body", "cpu") not in (cpu, TORCH_FLOAT32.namespace("body", "cuda"))


@needs_openvino
def test_features_pytorch_cached_are_not_converted_away(sample, tmp_path, monkeypatch):
    """Until the body is converted, "auto" converts for a call with enough images *to embed*:
    a call whose images PyTorch embedded before, but one, stays in PyTorch and reuses them."""
    import torch
    from torch import nn

    monkeypatch.setattr(_engine, "OPENVINO_MIN_IMAGES", 3)  # stands in for 500
    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path / "engine"))
    torch.manual_seed(0)
    embedder = ImageEmbedder(backbone=nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())).fit()
    X = sample[0][:6]
    before = embedder.transform(X[:2])  # 2 images: PyTorch
    with ForwardCounter(embedder.backbone_.module) as counter:
        again = embedder.transform(X[:3])  # 1 image to embed
    assert counter.images == 1
    np.testing.assert_array_equal(again[:2], before)
    assert not (tmp_path / "engine").exists()  # nothing converted
    embedder.transform(X)  # 3 images to embed: converted, and all six run in OpenVINO
    assert list((tmp_path / "engine").glob("*.xml"))


@needs_openvino
@pytest.mark.parametrize("engine", ["auto", "openvino"])
def test_unusable_inputs_are_told_before_the_body_is_converted(sample, tmp_path, monkeypatch, engine):
    from torch import nn

    from sktransfer import ImageInputError

    monkeypatch.setattr(_engine, "OPENVINO_MIN_IMAGES", 3)  # stands in for 500
    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path / "engine"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    embedder = ImageEmbedder(backbone=nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU()), engine=engine).fit()
    with pytest.raises(ImageInputError, match=r"\[3\] .*broken\.jpg"):
        embedder.transform([*sample[0][:3], str(tmp_path / "broken.jpg")])
    assert not (tmp_path / "engine").exists()  # nothing converted


@needs_openvino
@pytest.mark.slow
def test_fine_tuning_runs_the_frozen_prefix_in_the_engine(sample):
    X, y = sample[0][::15], sample[1][::15]
    fits = {engine: PretrainedImageClassifier(engine=engine, precision="float32", unfreeze=1, max_epochs=2,
                                              random_state=0).fit(X, y) for engine in ("torch", "openvino")}
    prefix = fits["openvino"].embedder_.backbone_.prefix(1)
    assert prefix.plan(engine="openvino", precision="float32").engine == "openvino"
    clear_cache()
    probas = {engine: clf.predict_proba(X) for engine, clf in fits.items()}
    np.testing.assert_allclose(probas["openvino"], probas["torch"], atol=1e-3)


_LOAD_WITHOUT_OPENVINO = r'''
import json, pickle, sys, warnings
sys.modules["openvino"] = None  # as on a machine without OpenVINO: importing it fails
warnings.simplefilter("always")
model = pickle.load(open(sys.argv[1], "rb"))
paths = json.loads(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    first = model.predict_proba(paths)
    second = model.predict_proba(paths[::-1])
told = [str(w.message) for w in caught if "OpenVINO" in str(w.message)]
print(json.dumps({"proba": first.tolist(), "again": second[::-1].tolist(), "told": told}))
'''


@needs_openvino
def test_openvino_model_pickles_and_predicts_the_same_where_openvino_is_missing(tmp_path, sample):
    X, y = sample[0][::5], sample[1][::5]
    clf = PretrainedImageClassifier(engine="openvino", random_state=0).fit(X, y)
    assert clf.embedder_.backbone_._handles  # the compiled body, kept for this process only
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(clf))
    expected = clf.predict_proba(X[:6])
    child = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_OPENVINO, str(path), json.dumps(X[:6])],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.splitlines()[-1])
    assert len(result["told"]) == 1 and "runs in PyTorch" in result["told"][0]  # told once, not per call
    np.testing.assert_allclose(result["proba"], expected, atol=1e-4)
    np.testing.assert_allclose(result["again"], expected, atol=1e-4)


def test_a_gpu_backbone_says_nothing_of_a_missing_openvino(tmp_path):
    # OpenVINO runs on the CPU only: a GPU's plan has no use for it, so its absence is no
    # news there. (The plan is chosen without CUDA: this runs on any machine.)
    code = (
        "import json, sys, warnings\n"
        "sys.modules['openvino'] = None\n"
        "from sktransfer import ImageEmbedder\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    plan = ImageEmbedder().fit().backbone_.plan('cuda', 'auto', 'auto', 'auto', n_images=10**6)\n"
        "print(json.dumps({'plan': [plan.engine, plan.precision], 'told': [str(w.message) for w in caught]}))\n"
    )
    env = {**fresh_env(), "SKTRANSFER_ENGINE_CACHE": str(tmp_path)}  # none converted, as without OpenVINO
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["plan"] == ["torch", "float32"]
    assert not [m for m in out["told"] if "OpenVINO" in m], out["told"]


def test_a_gpu_leaves_every_thread_torch_may_use_to_decoding():
    from sktransfer._features import decode_workers

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert (decode_workers("cpu"), decode_workers("cuda"), decode_workers("cuda:1")) == (4, 8, 8)
        torch.set_num_threads(1)  # as a joblib or dask worker caps it
        assert (decode_workers("cpu"), decode_workers("cuda")) == (1, 1)
    finally:
        torch.set_num_threads(before)


LAZY_EMBED = r"""
import json, pickle, sys
import numpy as np
from sktransfer import ImageEmbedder
paths, out = json.loads(sys.argv[1]), sys.argv[2]
embedder = ImageEmbedder(engine="openvino").fit()
features = embedder.transform(paths)
built = "timm" in sys.modules
again = pickle.loads(pickle.dumps(embedder)).transform(paths)  # a pickle carries the body: built for it
np.save(out, features)
print(json.dumps({"built": built, "pickled_equal": bool(np.array_equal(again, features))}))
"""


@needs_openvino
def test_a_body_converted_before_embeds_in_a_fresh_process_without_being_built(sample, tmp_path):
    """Building the body (timm, which imports torchvision and torch._dynamo: about 3 s of CPU in a
    fresh process) is left until something needs it when its OpenVINO conversion is on disk: an
    embedding job pays only the conversion's loading, with the same features."""
    paths = sample[0][:3]
    env = {**fresh_env(), "SKTRANSFER_ENGINE_CACHE": str(tmp_path / "engine")}

    def job(name):
        out = subprocess.run([sys.executable, "-c", LAZY_EMBED, json.dumps(paths), str(tmp_path / name)],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1]), np.load(tmp_path / name)

    first, converting = job("first.npy")  # nothing on disk: built and converted
    second, converted = job("second.npy")
    assert first == {"built": True, "pickled_equal": True}
    assert second == {"built": False, "pickled_equal": True}
    np.testing.assert_array_equal(converted, converting)


_FULL_DISK = r'''
import json, resource, sys, warnings
import torch
from torch import nn
from sktransfer import ImageEmbedder
from sktransfer import _engine
calls = []
convert = _engine.convert
_engine.convert = lambda *a, **k: calls.append(1) or convert(*a, **k)
torch.manual_seed(0)
embedder = ImageEmbedder(backbone=nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU()), engine="openvino").fit()
resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))  # a full disk: no file over 256 bytes
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = embedder.transform(sys.argv[1:]), embedder.transform(sys.argv[1:])
print(json.dumps({"shape": first.shape, "equal": bool((first == second).all()), "conversions": len(calls),
                  "told": [str(w.message) for w in caught if "converted backbone" in str(w.message)]}))
'''


@needs_openvino
@pytest.mark.skipif(sys.platform == "win32", reason="file size limits (RLIMIT_FSIZE) are POSIX's")
def test_a_conversion_that_cannot_be_kept_on_a_full_disk_still_embeds(sample, tmp_path):
    # OpenVINO tells a failed write as a RuntimeError, not an OSError: it used to fail every call.
    env = {**fresh_env(), "SKTRANSFER_ENGINE_CACHE": str(tmp_path / "engine")}
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, *sample[0][:2]], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["shape"] == [2, 4] and result["equal"] and result["conversions"] == 1
    assert len(result["told"]) == 1 and "later processes convert it again" in result["told"][0]


def _convert_fresh(tmp_path, monkeypatch, photos, part):
    """Convert the default body (``part="body"``) or its frozen part before the last block
    (``"prefix"``) into an empty engine cache, check its features on ``photos`` (OpenVINO
    float32) against PyTorch's, and return the warnings the conversion gave."""
    import warnings

    from sktransfer._cache import read_file
    from sktransfer._images import load_pixels

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path / "engine"))
    backbone = ImageEmbedder(engine="torch").fit().backbone_
    if part == "prefix":
        backbone = backbone.prefix(1)
    prep = backbone.preprocessing
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        model = _engine.convert(lambda: backbone.module, backbone.fingerprint, prep, backbone.name)
    assert model is not None
    assert [f.name for f in (tmp_path / "engine").iterdir() if f.suffix in (".xml", ".bin")]  # kept on disk
    pixels = [load_pixels(read_file(p)[1], prep) for p in photos]
    features = _engine.OpenVINORunner(_engine.compile_openvino(model, prep, "float32", 1))(pixels)
    reference = _engine.TorchRunner(backbone.module, prep, "cpu", "float32")(pixels)
    assert cosine(features, reference).min() >= MIN_COSINE
    return [str(w.message) for w in told if issubclass(w.category, RuntimeWarning)]


@needs_openvino
@pytest.mark.parametrize("part", ["body", "prefix"])
def test_a_body_is_converted_through_onnx_not_openvinos_pytorch_front_end(tmp_path, monkeypatch, photos, part):
    """Tracing to ONNX and reading that takes about a quarter of the time of
    openvino.convert_model's PyTorch front end, for the same graph (docs/benchmarks.md)."""
    import openvino

    front_end = []
    convert_model = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: front_end.append(1) or convert_model(*a, **k))
    assert _convert_fresh(tmp_path, monkeypatch, photos, part) == []
    assert front_end == []


@needs_openvino
@pytest.mark.parametrize("part", ["body", "prefix"])
def test_a_body_converts_through_openvinos_pytorch_front_end_without_onnx(tmp_path, monkeypatch, photos, part):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where the onnx package is not installed
    assert _convert_fresh(tmp_path, monkeypatch, photos, part) == []  # the same features, nothing told


def test_tracing_to_onnx_leaves_every_layers_mode_as_it_was():
    """PyTorch's exporter puts the module in eval mode and then calls ``train(mode)`` with the
    top module's mode, which would switch layers shared with a frozen body (its BatchNorm
    included) to training."""
    import torch
    from torch import nn

    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    wrapper = nn.Sequential(frozen, nn.Flatten())  # a new module: in training mode
    _engine.onnx_graph(wrapper, torch.zeros(1, 3, 8, 8), input_names=["images"], dynamic_axes={"images": {0: "n"}})
    assert wrapper.training and not any(m.training for m in frozen.modules())


class _Unconvertible(torch.nn.Module):
    """A body neither ONNX nor OpenVINO has a form for (singular values)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x):
        return torch.linalg.svdvals(self.conv(x).flatten(2))


@needs_openvino
@pytest.mark.parametrize("precision", ["auto", "float32", "bfloat16"])
def test_a_body_openvino_cannot_convert_runs_in_pytorch_at_the_precision_auto_or_the_cpu_allows(
        precision, photos, tmp_path, monkeypatch, capfd):
    import warnings

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path / "engine"))
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        embedder = ImageEmbedder(_Unconvertible(), engine="openvino", precision=precision).fit()
        plan = embedder.backbone_.plan(engine="openvino", precision=precision)
        features = embedder.transform(photos[:2])
    # PyTorch's emulated bfloat16 only where asked for explicitly and the CPU has it natively.
    native = precision == "bfloat16" and cpu_has_bf16()
    assert plan == Plan("torch", "bfloat16" if native else "float32")
    assert features.shape == (2, 8) and np.isfinite(features).all()
    assert sum("could not convert" in str(w.message) for w in told) == 1
    assert not [w for w in told if issubclass(w.category, torch.jit.TracerWarning)]
    assert capfd.readouterr().out == ""  # nothing on stdout: `sktransfer predict > out.csv` stays clean


@needs_openvino
def test_a_conversion_is_kept_per_torch_and_openvino_version(monkeypatch):
    """The converted graph is torch's trace read by OpenVINO: another release of either
    converts again."""
    import openvino

    path = _engine._model_path("fingerprint", (224, 224))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _engine._model_path("fingerprint", (224, 224)) != path
    monkeypatch.undo()
    monkeypatch.setattr(openvino, "get_version", lambda: "0.0.0")
    assert _engine._model_path("fingerprint", (224, 224)) != path


def _convert_told(backbone, pixels):
    """Convert ``backbone`` (or read its conversion from the engine cache): its OpenVINO
    float32 features of ``pixels`` and the warnings told."""
    import warnings

    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        model = _engine.convert(lambda: backbone.module, backbone.fingerprint, backbone.preprocessing, backbone.name)
    features = _engine.OpenVINORunner(_engine.compile_openvino(model, backbone.preprocessing, "float32", 1))(pixels)
    return features, [str(w.message) for w in told if issubclass(w.category, RuntimeWarning)]


@needs_openvino
def test_a_damaged_conversion_is_told_by_name_and_converted_again_never_served(tmp_path, monkeypatch, photos):
    """400 KB of the default body's weights zeroed in place, the file's size kept (a bad
    sector, a torn write): its features were served with cosine 0.90 to PyTorch's."""
    from sktransfer._cache import read_file
    from sktransfer._images import load_pixels

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path))
    backbone = ImageEmbedder(engine="torch").fit().backbone_
    pixels = [load_pixels(read_file(p)[1], backbone.preprocessing) for p in photos[:2]]
    reference = _engine.TorchRunner(backbone.module, backbone.preprocessing, "cpu", "float32")(pixels)
    assert _convert_told(backbone, pixels)[1] == []
    weights = tmp_path / os.path.basename(_engine._model_path(backbone.fingerprint, (224, 224))[:-4] + ".bin")
    size = weights.stat().st_size
    assert size > 12_400_000
    with open(weights, "r+b") as f:
        f.seek(12_000_000)
        f.write(bytes(400_000))
    assert weights.stat().st_size == size
    features, told = _convert_told(backbone, pixels)
    assert len(told) == 1 and repr(str(weights)) in told[0] and "converting it again" in told[0]
    assert cosine(features, reference).min() >= MIN_COSINE
    assert _convert_told(backbone, pixels)[1] == []  # converted again, whole: served from now on


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path.unlink()
    os.mkfifo(path)


def _link_to_another_file(path):
    other = path.with_name("other" + path.suffix)
    other.write_bytes(path.read_bytes())
    path.unlink()
    try:
        path.symlink_to(other)
    except OSError:
        pytest.skip("symbolic links cannot be made here")


@needs_openvino
@pytest.mark.parametrize("suffix,damage", [
    (suffix, damage) for suffix in (".xml", ".bin", ".digests.json")
    for damage in (_truncate, os.unlink, _fifo, _link_to_another_file)
    if (suffix, damage) != (".digests.json", os.unlink)  # no record: see the next test
], ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"))
def test_a_conversion_truncated_missing_or_replaced_is_converted_again(tmp_path, monkeypatch, photos, suffix, damage):
    """A half-copied folder, a file cut short, a FIFO planted (never waited on), a link:
    told once by name, converted again, with the same features."""
    from torch import nn

    from sktransfer._cache import read_file
    from sktransfer._images import load_pixels

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    backbone = build_backbone(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten()))
    pixels = [load_pixels(read_file(p)[1], backbone.preprocessing) for p in photos[:2]]
    converted, told = _convert_told(backbone, pixels)
    assert told == []
    path = tmp_path / os.path.basename(_engine._model_path(backbone.fingerprint, (224, 224))[:-4] + suffix)
    damage(path)
    features, told = _convert_told(backbone, pixels)
    assert len(told) == 1 and repr(str(path)) in told[0]
    np.testing.assert_array_equal(features, converted)
    assert path.is_file() and not path.is_symlink()
    assert _convert_told(backbone, pixels)[1] == []


@needs_openvino
def test_a_conversion_without_its_record_is_converted_again_silently(tmp_path, monkeypatch):
    """A writer stopped before the record (killed, a power cut): nothing vouches for the files."""
    from torch import nn

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    backbone = build_backbone(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.Flatten()))
    pixels = [np.zeros((224, 224, 3), np.uint8)]
    converted = _convert_told(backbone, pixels)[0]
    record = tmp_path / os.path.basename(_engine._model_path(backbone.fingerprint, (224, 224))[:-4] + ".digests.json")
    record.unlink()
    assert not _engine.is_converted(backbone.fingerprint, (224, 224))
    features, told = _convert_told(backbone, pixels)
    assert told == [] and record.is_file()
    np.testing.assert_array_equal(features, converted)


@needs_openvino
def test_each_file_of_a_conversion_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """A power cut after a rename must not leave an empty or partial file under the final
    name: each file is synced before it is renamed into place, the record last, and the
    folder after the renames."""
    from torch import nn

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path))
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b, **at: events.append(
        ("replace", os.stat(a, dir_fd=at.get("src_dir_fd")).st_ino, b)) or replace(a, b, **at))
    torch.manual_seed(0)
    backbone = build_backbone(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.Flatten()))
    _engine.convert(lambda: backbone.module, backbone.fingerprint, backbone.preprocessing, backbone.name)
    renamed = [(i, event) for i, event in enumerate(events) if event[0] == "replace"]
    assert [os.path.splitext(e[2])[1] for _, e in renamed] == [".xml", ".bin", ".json"]
    for i, (_, inode, _) in renamed:
        assert ("fsync", inode) in events[:i]
    assert ("fsync", tmp_path.stat().st_ino) in events[renamed[-1][0]:]
