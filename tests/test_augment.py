"""Views of an image (stage 2b): seeded augmentation, test-time views, their cache identity,
and how the head picks among views (``pick_view``)."""

import dataclasses
import hashlib
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from sktransfer import PretrainedImageClassifier, Preprocessing, clear_cache
from sktransfer._augment import View, augment_transform, augment_views, transform_identity, tta_views
from sktransfer._backbones import build_backbone
from sktransfer._features import extract_features
from sktransfer._head import pick_view

from conftest import import_file

# The default backbone's recipe: resize to 256, centre crop 224.
PREP = Preprocessing(resize_size=256, crop_size=224, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def photos(sample):
    """Two real photos, decoded, with a digest of each file's content."""
    out = []
    for path in sample[0][:2]:
        with open(path, "rb") as f:
            digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        out.append((Image.open(path).convert("RGB"), digest))
    return out


def pixels(image):
    return np.asarray(image)


# -- random views: seeded per image, reproducible --------------------------------

def test_a_random_view_is_the_same_for_the_same_image_seed_and_digest(photos):
    (image, digest), _ = photos
    view = augment_views("strong", 1, seed=0, preprocessing=PREP)[0]
    np.testing.assert_array_equal(pixels(view(image, digest)), pixels(view(image, digest)))
    # A view built again (another clone in a grid search) draws the same.
    again = augment_views("strong", 1, seed=0, preprocessing=PREP)[0]
    np.testing.assert_array_equal(pixels(again(image, digest)), pixels(view(image, digest)))


def test_seed_view_index_and_image_each_change_the_draw(photos):
    (image, digest), _ = photos
    first, second = augment_views("strong", 2, seed=0, preprocessing=PREP)
    other_seed = augment_views("strong", 1, seed=1, preprocessing=PREP)[0]
    base = pixels(first(image, digest))
    for other in (second(image, digest), other_seed(image, digest), first(image, "another digest")):
        assert not np.array_equal(pixels(other), base)


def test_a_random_view_leaves_the_global_generators_alone(photos):
    (image, digest), _ = photos
    view = augment_views("light", 1, seed=0, preprocessing=PREP)[0]
    torch.manual_seed(5)
    random.seed(5)
    expected = torch.rand(4), random.random()
    torch.manual_seed(5)
    random.seed(5)
    view(image, digest)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


def test_flip_view_is_the_mirror_image_or_the_image(photos):
    (image, digest), _ = photos
    draws = set()
    for view in augment_views("flip", 8, seed=0, preprocessing=PREP):
        out = pixels(view(image, digest))
        mirrored = np.array_equal(out, pixels(ImageOps.mirror(image)))
        assert mirrored or np.array_equal(out, pixels(image))
        draws.add(mirrored)
    assert draws == {True, False}  # eight seeded coin flips land both ways


def test_a_user_transform_must_return_a_pil_image(photos):
    (image, digest), _ = photos
    view = augment_views(T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]), 1, 0, PREP)[0]
    with pytest.raises(TypeError, match="must return a PIL image"):
        view(image, digest)


# -- identity: the cache key of a view's features ---------------------------------

def test_views_differ_in_key_by_seed_and_index_and_preset():
    light = augment_views("light", 2, seed=0, preprocessing=PREP)
    assert light[0].key != light[1].key
    assert light[0].key == augment_views("light", 1, seed=0, preprocessing=PREP)[0].key
    assert light[0].key != augment_views("light", 1, seed=1, preprocessing=PREP)[0].key
    assert light[0].key != augment_views("strong", 1, seed=0, preprocessing=PREP)[0].key


def test_a_preset_depends_on_the_preprocessing_it_crops_for():
    # Random crops are cut at the resize size: other preprocessing, other views.
    _, identity = augment_transform("light", PREP)
    _, other = augment_transform("light", dataclasses.replace(PREP, resize_size=320, crop_size=288))
    assert identity != other
    transform, _ = augment_transform("light", PREP)
    assert transform.transforms[0].size == (PREP.resize_size, PREP.resize_size)


def test_user_transforms_are_known_by_their_settings():
    one = T.Compose([T.RandomRotation(10), T.RandomHorizontalFlip()])
    same = T.Compose([T.RandomRotation(10), T.RandomHorizontalFlip()])
    other = T.Compose([T.RandomRotation(20), T.RandomHorizontalFlip()])
    assert transform_identity(one) == transform_identity(same)
    assert transform_identity(one) != transform_identity(other)
    assert augment_transform(one, PREP) == (one, transform_identity(one))


def _make(kind):
    if kind == "mirror":
        return lambda image: ImageOps.mirror(image)
    return lambda image: Image.new("RGB", image.size)


def _rotate(degrees):
    return lambda image: image.rotate(degrees)


def _turn(degrees):
    def turn(image, by=degrees):
        return image.rotate(by)
    return turn


def test_lambdas_and_inner_functions_are_known_by_their_code_closure_and_defaults():
    # Each lambda is dropped before the next is made, so the second may get the first's
    # address (and the same qualified name): its identity is still its own.
    assert transform_identity(_make("mirror")) != transform_identity(_make("black"))
    assert transform_identity(_rotate(10)) == transform_identity(_rotate(10)) != transform_identity(_rotate(20))
    assert transform_identity(_turn(10)) == transform_identity(_turn(10)) != transform_identity(_turn(20))
    # Two lambdas on one line: told apart too.
    first, second = (lambda image: image.rotate(90), lambda image: image.rotate(-90))
    assert transform_identity(first) != transform_identity(second)


def test_code_without_a_file_is_known_by_its_bytecode():
    # Code run by exec (or a notebook cell) has no file: its own code tells versions apart.
    identities = []
    for angle in (90, 90, 180):
        namespace = {"__name__": "sktransfer_test_no_file"}
        exec(f"def turn(image):\n    return image.rotate({angle})\n\n"
             f"class Turn:\n    def __call__(self, image):\n        return image.rotate({angle})\n", namespace)
        identities.append((transform_identity(namespace["turn"]), transform_identity(namespace["Turn"]())))
    same, again, other = identities
    assert same == again and other[0] != same[0] and other[1] != same[1]


def test_a_transform_whose_identity_cannot_be_written_is_never_reused():
    lock = threading.Lock()  # cannot be pickled: nothing says what the closure holds

    def locked(image):
        with lock:
            return image

    one, two = transform_identity(locked), transform_identity(locked)
    assert one != two and one.startswith("user-once:")


def test_user_code_in_a_file_is_known_by_the_files_text(tmp_path):
    path = tmp_path / "sktransfer_test_transforms.py"
    source = (
        "from PIL import ImageOps\n\n"
        "def helper(image):\n"
        "    return {}\n\n"
        "def flip(image):\n"
        "    return helper(image)\n\n"
        "class Flip:\n"
        "    def __call__(self, image):\n"
        "        return helper(image)\n"
    )
    identities = []
    for body in ("ImageOps.mirror(image)", "ImageOps.mirror(image)", "ImageOps.flip(image)"):
        path.write_text(source.format(body))
        module = import_file(path)
        identities.append((transform_identity(module.flip), transform_identity(module.Flip())))
    same, again, edited = identities
    assert same == again  # reusable: nothing but the code decides
    assert edited[0] != same[0] and edited[1] != same[1]  # only the helper they call was edited


def test_a_user_function_edited_in_its_file_gets_new_views(tmp_path, sample):
    paths, labels = sample
    X, y = [paths[i] for i in (0, 1, 30, 31)], labels[[0, 1, 30, 31]]
    backbone = build_backbone("efficientnet_lite0")
    path, cache = tmp_path / "sktransfer_test_augment.py", tmp_path / "cache"
    edits = (('Image.new("RGB", image.size)', lambda image: Image.new("RGB", image.size)),
             ("ImageOps.mirror(image)", ImageOps.mirror))  # another length: Python's bytecode cache sees it
    for body, expected in edits:
        path.write_text(f"from PIL import Image, ImageOps\n\ndef augment(image):\n    return {body}\n")
        augment = import_file(path).augment
        clear_cache()  # only the disk cache could serve views of the first version now
        clf = PretrainedImageClassifier(augment=augment, n_views=1, cache_dir=cache, max_epochs=2,
                                        random_state=0).fit(X, y)
        view, = augment_views(augment, 1, clf._seed(), backbone.preprocessing)
        served = extract_features(X, backbone, cache_dir=cache, view=view)  # what the fit cached
        images = [expected(Image.open(p).convert("RGB")) for p in X]
        np.testing.assert_allclose(served, extract_features(images, backbone), atol=1e-5)


# -- test-time views ---------------------------------------------------------------------

def test_tta_flip_is_the_image_and_its_mirror(photos):
    (image, digest), _ = photos
    plain, mirror = tta_views("flip", PREP)
    assert plain is None  # the plain image shares the features of a plain transform
    assert mirror.seed is None and mirror.key == "tta:flip|seed=None"
    np.testing.assert_array_equal(pixels(mirror(image, digest)), pixels(ImageOps.mirror(image)))


def test_tta_shifts_move_towards_each_corner_by_the_crop_margin(photos):
    (image, digest), _ = photos
    views = tta_views("flip+shift", PREP)
    assert len(views) == 6 and len({v.key for v in views[1:]}) == 5
    fraction = 1 - PREP.crop_size / PREP.resize_size  # 0.125: what the centre crop leaves
    w, h = image.size
    dx, dy = round(w * fraction), round(h * fraction)
    top_left, top_right, bottom_left, bottom_right = (pixels(v(image, digest)) for v in views[2:])
    full = pixels(image)
    np.testing.assert_array_equal(top_left, full[:h - dy, :w - dx])
    np.testing.assert_array_equal(top_right, full[:h - dy, dx:])
    np.testing.assert_array_equal(bottom_left, full[dy:, :w - dx])
    np.testing.assert_array_equal(bottom_right, full[dy:, dx:])


def test_tta_shift_is_at_least_a_sixteenth_without_a_crop_margin():
    views = tta_views("flip+shift", dataclasses.replace(PREP, resize_size=224))
    assert all(v.key.endswith(":0.0625|seed=None") for v in views[2:])


def test_unknown_tta_names_the_choices():
    with pytest.raises(ValueError, match=r"tta='mirror'.*\['flip', 'flip\+shift'\]"):
        tta_views("mirror", PREP)


def test_a_deterministic_view_needs_no_digest(photos):
    (image, _), _ = photos
    view = View(ImageOps.mirror, "tta:flip")
    np.testing.assert_array_equal(pixels(view(image, None)), pixels(ImageOps.mirror(image)))


# -- the head's choice among views ------------------------------------------------------

def test_plain_features_pass_through_pick_view():
    X = torch.arange(12.0).reshape(3, 4)
    for training in (True, False):
        out, n_views = pick_view(X, training)
        assert out is X and n_views is None


def test_prediction_keeps_every_view_in_image_order():
    X = torch.arange(24.0).reshape(2, 3, 4)  # 2 images, 3 views, 4 features
    out, n_views = pick_view(X, training=False)
    assert n_views == 3
    torch.testing.assert_close(out, X.reshape(6, 4))
    torch.testing.assert_close(out.view(2, 3, 4)[1, 2], X[1, 2])  # the caller averages per image


def test_training_draws_one_view_per_image_from_torchs_generator():
    n_images, n_views = 200, 4
    X = torch.arange(n_views, dtype=torch.float32).repeat(n_images, 1)[..., None].expand(n_images, n_views, 2)
    torch.manual_seed(0)
    out, n_views_out = pick_view(X, training=True)
    assert out.shape == (n_images, 2) and n_views_out is None
    chosen = out[:, 0].long()
    assert torch.equal(out[:, 0], out[:, 1])  # a whole view, not a mix of views
    assert set(chosen.tolist()) == {0, 1, 2, 3}  # every view is drawn over many images
    torch.manual_seed(0)
    assert torch.equal(pick_view(X, training=True)[0], out)  # random_state decides the draw
