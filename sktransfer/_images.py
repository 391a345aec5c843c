"""Stage 2: from an image item to the pixels a backbone expects.

:func:`open_image` decodes any accepted item into an RGB PIL image (EXIF
orientation applied, transparency flattened, first frame of animations,
16-bit and CMYK images converted). :class:`Preprocessing` holds the resize,
crop, interpolation and normalisation that travel with a backbone's weights,
and turns images into batches.
"""

from __future__ import annotations

import io
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


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a backbone: the weights' own recipe.

    The shorter side is resized to ``resize_size`` with ``interpolation``,
    the centre ``crop_size`` square is cut out, and pixel values in [0, 1]
    are normalised with ``mean`` and ``std`` per channel: the same steps as
    torchvision's ``ImageClassification`` preset and timm's eval transform.
    """

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple
    std: tuple

    def __post_init__(self):
        # Lists are the natural way to write mean/std; keep them as tuples so a
        # recipe is hashable and compares equal however it was written.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation={self.interpolation!r} is not supported; "
                f"use one of {sorted(_RESAMPLE)}."
            )

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
        """Read the recipe from a timm data config (``resolve_data_config``)."""
        crop = int(config["input_size"][-1])
        return cls(
            resize_size=int(math.floor(crop / config.get("crop_pct", 1.0))),
            crop_size=crop,
            interpolation=config.get("interpolation", "bilinear"),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )

    def to_array(self, image, draft=None):
        """Resize and crop one decoded RGB image; return an HxWx3 uint8 array."""
        w, h = image.size
        if w <= h:
            size = (self.resize_size, max(1, int(self.resize_size * h / w)))
        else:
            size = (max(1, int(self.resize_size * w / h)), self.resize_size)
        if size != (w, h):
            box = None
            if max(size) > 4 * max(self.crop_size, self.resize_size):
                # A long panorama: resample only the centre band the crop keeps
                # (the same pixels), not a resized copy of the whole strip.
                if w > h:
                    keep = w * self.crop_size / size[0]
                    box, size = ((w - keep) / 2, 0, (w + keep) / 2, h), (self.crop_size, size[1])
                else:
                    keep = h * self.crop_size / size[1]
                    box, size = (0, (h - keep) / 2, w, (h + keep) / 2), (size[0], self.crop_size)
            image = image.resize(size, _RESAMPLE[self.interpolation], box=box)
        w, h = image.size
        left = int(round((w - self.crop_size) / 2.0))
        top = int(round((h - self.crop_size) / 2.0))
        if left < 0 or top < 0:  # like torchvision's center_crop: pad with zeros
            canvas = Image.new("RGB", (max(w, self.crop_size), max(h, self.crop_size)))
            canvas.paste(image, (max(0, -left), max(0, -top)))
            image, left, top = canvas, max(0, left), max(0, top)
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return np.asarray(image, dtype=np.uint8)

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


def _open_header(payload):
    """Open an encoded image (a path or bytes) and check its header; nothing is decoded yet.

    The one header check: used before any backbone work and by :func:`open_image`.
    Raises ``ValueError`` with a short reason, ``OSError`` when a path cannot be read.
    """
    source = io.BytesIO(payload) if isinstance(payload, (bytes, bytearray)) else payload
    try:
        image = Image.open(source)
    except Image.DecompressionBombError:
        raise ValueError("image is above Pillow's decompression-bomb limit") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001  (a damaged header; see open_image)
        raise ValueError(f"image header is damaged ({type(e).__name__}: {e})") from None
    w, h = image.size
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise ValueError(
            f"image of {w}x{h} pixels is above Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
        )
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
    image = _open_header(payload)
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
    scale ``preprocessing`` allows (see :func:`open_image`); ``view`` (a
    :class:`sktransfer._augment.View`) transforms the decoded image, seeded by
    ``key``, before ``preprocessing.to_array`` resizes and crops it.
    """
    image = open_image(payload, min_size=preprocessing.resize_size)
    if view is not None:
        image = view(image, key)
    return preprocessing.to_array(image)


def _to_rgb(image):
    image = ImageOps.exif_transpose(image) if image.getexif() else image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Flatten transparency onto white, how the image looks in a viewer.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")

