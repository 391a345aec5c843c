"""Stage 2: from an image item to the pixels a backbone expects.

:func:`open_image` decodes any accepted item into an RGB PIL image (EXIF
orientation applied, transparency flattened, first frame of animations,
16-bit and CMYK images converted). :class:`Preprocessing` holds the resize,
crop, interpolation and normalisation that travel with a backbone's weights,
and turns images into batches.
"""

from __future__ import annotations

import io
import warnings
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_CROP_MODES = ("center", "squash", "border")
_TIMM_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT, used when a config has none


def _shape(value, name):
    """A size as (height, width): an int is a square."""
    try:
        pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"{name}={value!r} is not valid; use a positive int or a (height, width) pair.")
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True, repr=False)
class Preprocessing:
    """How images are prepared for a backbone: the weights' own recipe.

    The image is resized with ``interpolation`` as ``crop_mode`` says, the
    centre ``crop_size`` is cut out, and pixel values in [0, 1] are
    normalised with ``mean`` and ``std`` per channel: the same pixels as
    timm's eval transform (``transforms_imagenet_eval``) and torchvision's
    ``ImageClassification`` preset.

    Parameters
    ----------
    resize_size : int or (height, width)
        With ``crop_mode="center"``, an int is the length of the shorter side
        after resizing (torchvision's ``Resize(int)``); a pair is the smallest
        size that the resized image covers, keeping its aspect ratio. With
        ``"squash"`` the image is resized to exactly this size; with
        ``"border"`` it is resized to fit inside it, keeping its aspect ratio.
    crop_size : int or (height, width)
        The centre crop fed to the network.
    interpolation : str
        One of ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"lanczos"``,
        ``"box"``, ``"hamming"``.
    mean, std : sequence of 3 floats
        Per-channel normalisation of pixel values in [0, 1].
    crop_mode : {"center", "squash", "border"}, default="center"
        timm's crop modes: ``"center"`` keeps the aspect ratio and crops,
        ``"squash"`` ignores the aspect ratio, ``"border"`` keeps it and pads
        with the mean colour instead of cutting anything off.
    """

    resize_size: object
    crop_size: object
    interpolation: str
    mean: tuple
    std: tuple
    # A default, so recipes pickled before the field existed load as "center".
    crop_mode: str = "center"

    def __post_init__(self):
        # Lists are the natural way to write mean/std; keep them as tuples so a
        # recipe is hashable and compares equal however it was written. A
        # square size is stored as an int, as timm and torchvision treat it.
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3 or not all(math.isfinite(v) for v in values) or (
                    name == "std" and min(values) <= 0):
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; expected 3 finite numbers, "
                                 f"one per channel (R, G, B){', each above 0' if name == 'std' else ''}.")
            object.__setattr__(self, name, values)
        for name in ("resize_size", "crop_size"):
            h, w = _shape(getattr(self, name), name)
            object.__setattr__(self, name, h if h == w else (h, w))
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation={self.interpolation!r} is not supported; "
                f"use one of {sorted(_RESAMPLE)}."
            )
        if self.crop_mode not in _CROP_MODES:
            raise ValueError(f"crop_mode={self.crop_mode!r} is not supported; use one of {list(_CROP_MODES)}.")

    def __repr__(self):
        # The repr is part of feature fingerprints: the default crop mode is
        # left out so recipes from before the field keep their fingerprints.
        fields = [f"resize_size={self.resize_size!r}", f"crop_size={self.crop_size!r}",
                  f"interpolation={self.interpolation!r}", f"mean={self.mean!r}", f"std={self.std!r}"]
        if self.crop_mode != "center":
            fields.append(f"crop_mode={self.crop_mode!r}")
        return f"Preprocessing({', '.join(fields)})"

    @property
    def crop_shape(self):
        """``(height, width)`` of the crop: the network's input size."""
        return _shape(self.crop_size, "crop_size")

    @property
    def decode_size(self):
        """The shorter side a decoder may shrink an image to without losing pixels the resize keeps."""
        return max(_shape(self.resize_size, "resize_size"))

    @classmethod
    def from_torchvision(cls, transform):
        """Read the recipe from a torchvision ``weights.transforms()`` preset."""
        return cls(
            resize_size=int(transform.resize_size[0]),
            crop_size=int(transform.crop_size[0]),
            interpolation=transform.interpolation.value,
            mean=tuple(float(v) for v in transform.mean),
            std=tuple(float(v) for v in transform.std),
        )

    @classmethod
    def from_timm(cls, config):
        """Read the recipe from a timm data config (``timm.data.resolve_model_data_config``)."""
        crop = _shape(tuple(config["input_size"][-2:]), "input_size")
        crop_pct = config.get("crop_pct") or _TIMM_CROP_PCT
        return cls(
            resize_size=tuple(math.floor(side / crop_pct) for side in crop),
            crop_size=crop,
            interpolation=config.get("interpolation", "bilinear"),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            crop_mode=config.get("crop_mode") or "center",
        )

    def _resized(self, w, h):
        """The ``(width, height)`` the image is resized to."""
        if self.crop_mode == "center" and isinstance(self.resize_size, int):
            s = self.resize_size  # the shorter side, as torchvision's Resize(int)
            return (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
        rh, rw = _shape(self.resize_size, "resize_size")
        if self.crop_mode == "squash":
            return rw, rh
        ratios = (h / rh, w / rw)  # keep the ratio: cover the size ("center") or fit in it ("border")
        ratio = min(ratios) if self.crop_mode == "center" else max(ratios)
        return max(1, round(w / ratio)), max(1, round(h / ratio))

    def to_array(self, image):
        """Resize and crop one decoded RGB image; return an HxWx3 uint8 array."""
        w, h = image.size
        size = self._resized(w, h)
        ch, cw = self.crop_shape
        if size != (w, h):
            box = None
            if self.crop_mode == "center" and max(size) > 4 * max(ch, cw, self.decode_size):
                # A long panorama: resample only the centre band the crop keeps (from the
                # whole pixel where _crop_or_pad would cut the resized strip), not a resized
                # copy of the whole strip. Nearly the same pixels: Pillow reads the box as
                # float32, so a weight may round apart.
                if w > h:
                    left, scale = int(round((size[0] - cw) / 2.0)), w / size[0]
                    box, size = (left * scale, 0, (left + cw) * scale, h), (cw, size[1])
                else:
                    top, scale = int(round((size[1] - ch) / 2.0)), h / size[1]
                    box, size = (0, top * scale, w, (top + ch) * scale), (size[0], ch)
            image = image.resize(size, _RESAMPLE[self.interpolation], box=box)
        fill = tuple(round(255 * v) for v in self.mean) if self.crop_mode == "border" else (0, 0, 0)
        return np.asarray(_crop_or_pad(image, ch, cw, fill), dtype=np.uint8)

    def normalize(self, batch, device="cpu", channels_last=False):
        """Turn a list of HxWx3 uint8 arrays into a normalised NCHW float batch."""
        x = torch.from_numpy(np.stack(batch)).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _too_large(size=None):
    """Why an image above Pillow's refusal is refused, with how to let it through."""
    what = f"image of {size[0]}x{size[1]} pixels" if size else "image"
    return (f"{what} is above twice Pillow's decompression-bomb limit, where Pillow refuses it "
            f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; for images you trust, raise it, or set it "
            "to None)")


def _open_header(payload):
    """Open an encoded image (a path or bytes) and check its header; nothing is decoded yet.

    The one header check: used before any backbone work and by :func:`open_image`.
    Raises ``ValueError`` with a short reason, ``OSError`` when a path cannot be read.
    """
    source = io.BytesIO(payload) if isinstance(payload, (bytes, bytearray)) else payload
    try:
        with warnings.catch_warnings():
            # Pillow warns up to twice its limit and refuses beyond. Up to there the image is
            # read, as Pillow reads it (a 108-megapixel phone photo is 1.2x the default limit),
            # without a warning per image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError:
        raise ValueError(_too_large()) from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001  (a damaged header; see open_image)
        raise ValueError(f"image header is damaged ({type(e).__name__}: {e})") from None
    w, h = image.size
    if Image.MAX_IMAGE_PIXELS and w * h > 2 * Image.MAX_IMAGE_PIXELS:  # a format Pillow does not check
        image.close()
        raise ValueError(_too_large((w, h)))
    if w < 1 or h < 1:
        image.close()
        raise ValueError(f"image has no pixels ({w}x{h})")
    return image


def header_error(payload):
    """The reason an encoded image (path or bytes) is unusable by its header, or None.

    Cheap (nothing is decoded): run on every input before any backbone work.
    Decoded items (PIL images, arrays) have no header and pass.
    """
    if not isinstance(payload, (bytes, bytearray, str)):
        return None
    try:
        _open_header(payload).close()
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def _crop_or_pad(image, ch, cw, fill):
    """The centre ``ch`` x ``cw`` of ``image``, padded with ``fill`` where it is smaller
    (the padding split as torchvision's ``center_crop`` and timm's ``CenterCropOrPad`` split it)."""
    w, h = image.size
    if cw > w or ch > h:
        left, top = max(0, (cw - w) // 2), max(0, (ch - h) // 2)
        canvas = Image.new("RGB", (max(w, cw), max(h, ch)), fill)
        canvas.paste(image, (left, top))
        image, (w, h) = canvas, canvas.size
    left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
    return image.crop((left, top, left + cw, top + ch))


def open_image(payload, min_size=None):
    """Decode one image item into an RGB PIL image.

    ``payload`` is a path, encoded bytes, a PIL image or a uint8 array.
    ``min_size`` lets a JPEG decode at a reduced scale (Pillow's draft mode)
    while its shorter side stays at least ``min_size`` pixels: the resize
    that follows gives nearly the same pixels at a fraction of the cost.

    Raises ``ValueError`` with a short reason for data that is not a usable
    image (of any kind of damage), ``OSError`` when a path cannot be read.
    """
    if isinstance(payload, np.ndarray):
        arr = payload
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        image = Image.fromarray(np.ascontiguousarray(arr))
        return _to_rgb(image)
    if isinstance(payload, Image.Image):
        return _to_rgb(payload.copy() if payload.mode == "RGB" else payload)
    # Leaving the block closes the file, which Pillow keeps open after decoding
    # the first frame of a multi-frame GIF or TIFF; the decoded pixels stay.
    with _open_header(payload) as image:
        w, h = image.size
        try:
            if min_size and image.format == "JPEG" and min(w, h) > 2 * min_size:
                scale = min_size / min(w, h)
                image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            image.load()
            return _to_rgb(image)
        except Exception as e:  # noqa: BLE001
            # Damaged files make Pillow's decoders fail in many ways (OSError,
            # SyntaxError, struct.error, IndexError, ...): report them all as one
            # documented error instead of letting a decoder's internals escape.
            raise ValueError(f"image data is damaged or truncated ({type(e).__name__}: {e})") from None


def load_pixels(payload, preprocessing, view=None, key=None):
    """The pixels a backbone sees of one image item: HxWx3 uint8.

    The one decoding path of the package: embedding, Grad-CAM and the
    pictures all take their pixels from here. JPEGs decode at the reduced
    scale ``preprocessing`` allows (see :func:`open_image`), unless a
    ``view`` (a :class:`sktransfer._augment.View`) transforms the decoded
    image first, seeded by ``key``: a view sees the whole photo, as it would
    from a PIL image or an array (its crops and shifts in pixels mean the
    same whatever form the photo is given in). ``preprocessing.to_array``
    then resizes and crops it.
    """
    image = open_image(payload, min_size=preprocessing.decode_size if view is None else None)
    if view is not None:
        image = view(image, key)
    return preprocessing.to_array(image)


def _to_rgb(image):
    image = ImageOps.exif_transpose(image) if image.getexif() else image
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Scaled by the mode, never by the picture's own values, so equal values
        # decode equally in every file: integers as 16-bit values (16-bit photos
        # are often stored in 32-bit containers), floats as [0, 1].
        arr = np.asarray(image).astype(np.float64)
        top = 1.0 if mode == "F" else 65535.0
        arr = np.rint(np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("P", "RGB", "L") and "transparency" in image.info:  # a transparent colour (PNG's tRNS)
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Flatten transparency onto white, how the image looks in a viewer.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")

