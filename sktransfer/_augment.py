"""Stage 2b: views of an image, applied to decoded pixels before preprocessing.

A :class:`View` is a transform of a decoded RGB PIL image with a stable
identity, so the features of a view can be cached like those of the image
itself: the cache key is the backbone fingerprint, the view's identity and
the image content. Random views (training augmentation) are seeded per
image, view index and seed, so they are reproducible and reusable across
the clones of a grid search; deterministic views serve test-time
augmentation.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import io
import os
import pickle
import site
import sys
import sysconfig
import types
import uuid

import torch
from PIL import Image, ImageOps

from ._cache import class_code, digest as content_digest, function_code, source_digest
from ._runtime import seeded_rng

__all__ = ["AUGMENT_PRESETS", "TTA_PRESETS"]

#: Names accepted as ``augment=``.
AUGMENT_PRESETS = ("flip", "light", "strong")
#: Names accepted as ``tta=``.
TTA_PRESETS = ("flip", "flip+shift")

class View:
    """One view of every image: ``transform(image) -> image`` with a cache identity.

    Parameters
    ----------
    transform : callable
        Takes and returns an RGB PIL image.
    identity : str
        Names the transform; equal identities must mean equal transforms.
    seed : int or None
        For a random transform: the generators are seeded from ``seed`` and
        the image's content digest, so each image gets its own, reproducible
        draw. None for a deterministic transform.
    name : str, default="view"
        How errors name the transform: the parameter that gave it (``augment=...``).
    """

    def __init__(self, transform, identity, seed=None, name="view"):
        self.transform = transform
        self.identity = identity
        self.seed = seed
        self.name = name

    @property
    def key(self):
        """The part of the cache key that tells this view apart."""
        return f"{self.identity}|seed={self.seed}"

    def __call__(self, image, digest):
        """The view of ``image``; :class:`TransformError` when the transform raises."""
        try:
            if self.seed is None:
                image = self.transform(image)
            else:
                h = hashlib.blake2b(f"{self.seed}|{digest}".encode(), digest_size=8).digest()
                # Random transforms draw from torch's, NumPy's or Python's global generators.
                with seeded_rng(int.from_bytes(h, "little") & (2**63 - 1)):
                    image = self.transform(image)
        except Exception as e:  # noqa: BLE001  (whatever the user's code raises)
            raise TransformError(self.name, e) from e
        return _to_pil(image)


class TransformError(Exception):
    """A view's transform raised on an image: the transform's fault, not the image's.

    Not a ``ValueError`` or ``OSError``, so it is not taken for an image that
    cannot be decoded; :meth:`located` makes the error the user sees.
    """

    def __init__(self, name, error):
        super().__init__(f"{name} failed: {type(error).__name__}: {error}")
        self.name = name
        self.error = error

    def located(self, where):
        """A ``ValueError`` naming the transform, the image (``where``) and the transform's error."""
        return ValueError(f"{self.name} failed on {where}: {type(self.error).__name__}: {self.error}")


def _to_pil(image):
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    raise TypeError(
        f"augment transforms must return a PIL image (they run before resizing, cropping and "
        f"normalisation), got {type(image).__name__}; leave out ToTensor/Normalize."
    )


class _CodePickler(pickle.Pickler):
    """Writes a transform as what it computes: functions and classes by their code and the
    text of the files that define them, not by reference to their names as pickle does;
    tensors by their values, not by the address of their storage as torch does.

    The functions and classes of user code written so far are listed in ``reached``,
    in order: the values of the globals they read are written after the transform
    (:meth:`dump_globals`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reached = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):  # a v2 transform's parameters, a closure's tensor
            values = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            return tuple, (("torch.Tensor", str(obj.dtype), tuple(obj.shape), values.numpy().tobytes()),)
        if isinstance(obj, types.FunctionType):  # a lambda, an inner function, a module's function
            self._reach(obj, obj.__module__)
            cells = tuple(_cell_contents(cell) for cell in obj.__closure__ or ())
            return tuple, ((obj.__module__, obj.__qualname__, function_code(obj), source_digest(obj.__module__),
                            obj.__defaults__, obj.__kwdefaults__, cells, vars(obj)),)
        if isinstance(obj, type) and obj.__module__ != "builtins":  # built-in ones (tuple) go by name
            self._reach(obj, obj.__module__)
            # A class's file holds its methods' code; without one (a notebook's, exec'd), their code.
            return tuple, ((obj.__module__, obj.__qualname__, source_digest(obj.__module__) or class_code(obj)),)
        if isinstance(obj, types.ModuleType):  # a module a closure, a default or a global holds
            return tuple, ((obj.__name__, source_digest(obj.__name__)),)
        return NotImplemented

    def _reach(self, obj, module_name):
        if not _installed(module_name):
            self.reached.append(obj)

    def dump_globals(self):
        """Write the values of the globals that the user code reached reads, and of those
        that the code they hold reads in turn. Functions and classes already written are
        written again as references to them, so code that calls itself ends."""
        done = 0
        while done < len(self.reached):
            obj = self.reached[done]
            done += 1
            self.dump(_globals_read(obj))


def _globals_read(obj):
    """``(name, value)`` of each global that a function's code (or a class's methods') names."""
    functions = [obj] if isinstance(obj, types.FunctionType) else [
        getattr(value, "__func__", value) for cls in obj.__mro__ if not _installed(cls.__module__)
        for value in vars(cls).values()]
    found = {}
    for function in functions:
        if isinstance(function, types.FunctionType):
            namespace = function.__globals__
            found.update((name, namespace[name]) for name in _names(function.__code__) if name in namespace)
    return sorted(found.items(), key=lambda item: item[0])


def _names(code):
    """The global (and attribute) names a code object and the code it defines use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # an inner function, a lambda, a comprehension
            names |= _names(const)
    return names


def _installed(module_name):
    """Whether module ``module_name`` comes from Python itself or an installed package: its
    code counts by its file's text, and the values of its globals are taken as fixed."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    return path is not None and _installed_file(path)


@functools.lru_cache(maxsize=None)
def _installed_file(path):
    return os.path.realpath(path).startswith(_installed_folders())


@functools.lru_cache(maxsize=None)
def _installed_folders():
    paths = sysconfig.get_paths()
    folders = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    folders += [*site.getsitepackages(), site.getusersitepackages()]
    return tuple(sorted({os.path.join(os.path.realpath(folder), "") for folder in folders}))


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return "<empty cell>"


def transform_identity(transform):
    """A stable identity of a user transform: a digest of what it computes.

    Functions (lambdas and inner functions too) count by their code, the text
    of their module's file, their defaults, the values their closure holds and
    the values of the globals their code names; classes by their module's file
    and the globals their methods name; tensors by their values; other objects
    by their pickled state. The globals of the functions and classes reached so
    count too (modules by name and file), except in Python's own and installed
    packages, whose globals are taken as fixed. A transform that cannot be
    written so (a closure or a global holding a lock, say) gets an identity
    never given again, so none of its cached views is ever reused.
    """
    buffer = io.BytesIO()
    try:
        pickler = _CodePickler(buffer, protocol=4)
        pickler.dump(transform)
        pickler.dump_globals()
    except Exception:  # noqa: BLE001  (pickle raises many kinds: TypeError, PicklingError, RecursionError, ...)
        return f"user-once:{uuid.uuid4().hex}"
    return "user:" + content_digest(buffer.getvalue())


def is_estimator(obj):
    """Whether ``obj`` is a scikit-learn estimator: an object whose ``get_params`` takes ``deep``.

    scikit-learn takes any object with a ``get_params`` for one; torchvision's
    ``RandomResizedCrop``, ``RandomCrop`` and ``ColorJitter`` have a static
    ``get_params`` that draws their random parameters instead.
    """
    try:
        return not isinstance(obj, type) and "deep" in inspect.signature(obj.get_params).parameters
    except (AttributeError, TypeError, ValueError):  # no get_params, or one without a signature
        return False


def copy_augment(augment):
    """``augment`` for a clone of its estimator: an estimator's clone, else a deep copy."""
    from sklearn.base import clone

    return clone(augment) if is_estimator(augment) else copy.deepcopy(augment)


def augment_transform(augment, preprocessing):
    """The random transform of ``augment=`` (a preset name or a callable) and its identity."""
    from torchvision import transforms as T

    if callable(augment):
        return augment, transform_identity(augment)
    interpolation = T.InterpolationMode(preprocessing.interpolation)
    # Random crops are cut at the resize size, so the weights' centre crop
    # that follows keeps its usual proportion of each crop.
    size = preprocessing.resize_size
    presets = {
        "flip": lambda: T.RandomHorizontalFlip(),
        "light": lambda: T.Compose([
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interpolation),
            T.RandomHorizontalFlip(),
        ]),
        "strong": lambda: T.Compose([
            T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        ]),
    }
    # The preset's name and the preprocessing it depends on are its identity.
    return presets[augment](), f"preset:{augment}:v1:{preprocessing!r}"


def augment_views(augment, n_views, seed, preprocessing):
    """``n_views`` random views of ``augment``, each with its own seed stream."""
    transform, identity = augment_transform(augment, preprocessing)
    name = f"augment={_brief(augment)}"
    return [View(transform, identity, seed=f"{seed}/{k}", name=name) for k in range(n_views)]


def _brief(value, width=160):
    """``value`` for an error message: a function by its name, another object by its
    ``repr`` on one line (a Compose's spans several), cut at ``width`` characters."""
    if isinstance(value, types.FunctionType):
        return f"<function {value.__qualname__}>"
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _shift(corner, fraction):
    def shift(image):
        w, h = image.size
        dx, dy = round(w * fraction), round(h * fraction)
        left = dx if corner[0] else 0
        top = dy if corner[1] else 0
        return image.crop((left, top, left + w - dx, top + h - dy))
    return shift


def tta_views(tta, preprocessing):
    """The deterministic views of ``tta=``; the first is the plain image (None)."""
    if tta not in TTA_PRESETS:
        raise ValueError(f"tta={tta!r} is not valid; use None or one of {list(TTA_PRESETS)}.")
    name = f"tta={tta!r}"
    views = [None, View(ImageOps.mirror, "tta:flip", name=name)]
    if tta == "flip+shift":
        # Shift by the margin the centre crop leaves (1 - crop/resize of each side).
        fraction = max(0.0625, 1.0 - max(preprocessing.crop_shape) / preprocessing.decode_size)
        for corner in ((0, 0), (1, 0), (0, 1), (1, 1)):
            views.append(View(_shift(corner, fraction), f"tta:shift{corner}:{fraction:.4f}", name=name))
    return views
