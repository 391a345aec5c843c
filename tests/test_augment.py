"""Views of an image (stage 2b): seeded augmentation, test-time views, their cache identity,
and how the head picks among views (``pick_view``)."""

import copy
import dataclasses
import hashlib
import json
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from torchvision import transforms as T
from torchvision.transforms import v2 as T2

from sktransfer import ImageInputError, PretrainedImageClassifier, Preprocessing, cache_info, clear_cache
from sktransfer._augment import View, augment_transform, augment_views, transform_identity, tta_views
from sktransfer._backbones import build_backbone
from sktransfer._features import extract_features
from sktransfer._head import pick_view

from conftest import fresh_env, import_file

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

def test_a_view_sees_a_photo_at_its_own_size_however_it_is_given(tmp_path, sample):
    # A crop or shift in pixels means the same whether the photo comes as a path, bytes, a PIL
    # image or an array: the view gets the whole decoded photo, not a reduced-scale decode.
    from sktransfer._images import load_pixels

    path = tmp_path / "big.jpg"
    Image.open(sample[0][0]).convert("RGB").resize((2048, 1536)).save(path, quality=90)
    seen = []

    def top_left_quarter(image):
        seen.append(image.size)
        return image.crop((0, 0, image.width // 2, image.height // 2))

    view = augment_views(top_left_quarter, 1, seed=0, preprocessing=PREP)[0]
    decoded = Image.open(path).convert("RGB")
    given = [str(path), path.read_bytes(), decoded, np.asarray(decoded)]
    arrays = [load_pixels(item, PREP, view, key="photo") for item in given]
    assert seen == [(2048, 1536)] * 4
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])


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


# -- identity: the globals a transform reads --------------------------------------------

_GLOBALS_MODULE = '''
from PIL import ImageEnhance

BRIGHTNESS = 0.5
CONTRAST = 1.0


def contrast(image):
    return ImageEnhance.Contrast(image).enhance(CONTRAST)


def darken(image):
    return contrast(ImageEnhance.Brightness(image).enhance(BRIGHTNESS))


def repeat(image, times=2):
    return image if times == 0 else repeat(image, times - 1)


class Darken:
    def __call__(self, image):
        return darken(image)
'''


def test_a_function_is_known_by_the_globals_it_reads(tmp_path):
    path = tmp_path / "sktransfer_test_globals.py"
    path.write_text(_GLOBALS_MODULE)
    module = import_file(path)

    def identities():
        return transform_identity(module.darken), transform_identity(module.Darken())

    first = identities()
    assert identities() == first  # deterministic
    module.BRIGHTNESS = 0.0  # read by the function itself
    darker = identities()
    module.CONTRAST = 2.0  # read by a function it calls
    contrasted = identities()
    assert len({first, darker, contrasted}) == 3
    assert all(a != b for a, b in zip(first, darker))
    module.BRIGHTNESS, module.CONTRAST = 0.5, 1.0
    assert identities() == first  # the values count, not the history
    # A function that calls itself is known by its code, as any other.
    assert transform_identity(module.repeat) == transform_identity(module.repeat)
    assert not transform_identity(module.repeat).startswith("user-once:")


def test_a_global_that_cannot_be_written_makes_views_never_reused(tmp_path):
    path = tmp_path / "sktransfer_test_global_lock.py"
    path.write_text("import threading\n\nLOCK = threading.Lock()\n\n"
                    "def locked(image):\n    with LOCK:\n        return image\n")
    module = import_file(path)
    one, two = transform_identity(module.locked), transform_identity(module.locked)
    assert one != two and one.startswith("user-once:")


def test_a_changed_global_gets_new_views_in_the_same_process(tmp_path, sample):
    paths, labels = sample
    X, y = [paths[i] for i in (0, 1, 30, 31)], labels[[0, 1, 30, 31]]
    backbone = build_backbone("efficientnet_lite0")
    path = tmp_path / "sktransfer_test_brightness.py"
    path.write_text(_GLOBALS_MODULE)
    module = import_file(path)
    for brightness in (0.0, 1.0):  # black views, then the photos themselves
        module.BRIGHTNESS = brightness
        clf = PretrainedImageClassifier(augment=module.darken, n_views=1, max_epochs=1,
                                        random_state=0).fit(X, y)
        view, = augment_views(module.darken, 1, clf._seed(), backbone.preprocessing)
        served = extract_features(X, backbone, view=view)  # what the fit cached
        images = [module.darken(Image.open(p).convert("RGB")) for p in X]
        np.testing.assert_allclose(served, extract_features(images, backbone), atol=1e-5)


# -- the same in fresh processes: globals, NumPy's generator, tensors ----------------------

_FRESH_PROCESS = r'''
import hashlib, json, sys
import numpy as np
from PIL import Image, ImageEnhance
from torchvision.transforms import v2 as T2
from sktransfer import PretrainedImageClassifier
from sktransfer._augment import augment_views, transform_identity
from sktransfer._features import extract_features

BRIGHTNESS = float(sys.argv[1])
X, y, cache = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]


def darken(image):
    return ImageEnhance.Brightness(image).enhance(BRIGHTNESS)


def jitter(image):  # draws from NumPy's global generator, as albumentations does
    return ImageEnhance.Brightness(image).enhance(np.random.uniform(0.5, 1.5))


clf = PretrainedImageClassifier(augment=darken, n_views=1, max_epochs=1, random_state=0,
                                cache_dir=cache).fit(X, y)
backbone = clf.embedder_.backbone_
view, = augment_views(darken, 1, clf._seed(), backbone.preprocessing)
served = extract_features(X, backbone, cache_dir=cache, view=view)
expected = extract_features([darken(Image.open(p).convert("RGB")) for p in X], backbone)
clf = PretrainedImageClassifier(augment=jitter, n_views=2, max_epochs=2, random_state=0).fit(X, y)
head = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in clf.head_.module_.parameters()))
print(json.dumps({
    "darken": transform_identity(darken),
    "served_as_computed": bool(np.allclose(served, expected, atol=1e-5)),
    "jitter_head": head.hexdigest(),
    "v2": transform_identity(T2.Compose([T2.RandomResizedCrop(256), T2.RandomHorizontalFlip()])),
}))
'''


@pytest.fixture(scope="module")
def two_processes(sample, tmp_path_factory):
    """The outputs of ``_FRESH_PROCESS`` run in two fresh processes one after the other,
    sharing a cache_dir: first with BRIGHTNESS=0.0, then with 1.0."""
    paths, labels = sample
    X, y = [paths[i] for i in (0, 1, 30, 31)], [str(v) for v in labels[[0, 1, 30, 31]]]
    folder = tmp_path_factory.mktemp("fresh")
    script = folder / "fit_augmented.py"
    script.write_text(_FRESH_PROCESS)
    outputs = []
    for brightness in ("0.0", "1.0"):
        done = subprocess.run([sys.executable, str(script), brightness, json.dumps(X), json.dumps(y),
                               str(folder / "cache")], env=fresh_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return outputs


def test_a_global_set_otherwise_in_another_process_gets_new_views(two_processes):
    black, plain = two_processes
    assert black["darken"] != plain["darken"]
    # The second process finds the first one's black views on disk, and does not take them.
    assert black["served_as_computed"] and plain["served_as_computed"]


def test_an_augment_drawing_from_numpy_gives_equal_models_in_fresh_processes(two_processes):
    first, second = two_processes
    assert first["jitter_head"] == second["jitter_head"]


def test_a_transform_holding_tensors_keeps_its_identity_in_fresh_processes(two_processes):
    first, second = two_processes
    assert first["v2"] == second["v2"] and not first["v2"].startswith("user-once:")


# -- identity: transforms that hold tensors ---------------------------------------------

def test_a_transform_holding_tensors_is_known_by_their_values():
    for transform in (T2.RandomResizedCrop(224), T2.ColorJitter(0.3),
                      T2.Compose([T2.RandomResizedCrop(224), T2.RandomHorizontalFlip()])):
        assert transform_identity(transform) == transform_identity(copy.deepcopy(transform))
    # Equal values in separate tensors: one identity; other values, dtypes or shapes: others.
    identities = [transform_identity(lambda image, k=k: image) for k in (
        torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([[1.0]]), torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0])[:0])]
    assert identities[0] == identities[1] and len(set(identities)) == len(identities) - 1


def test_clones_of_a_tensor_holding_augment_reuse_the_cached_views(tmp_path, sample):
    paths, labels = sample
    X, y = [paths[i] for i in (0, 1, 30, 31)], labels[[0, 1, 30, 31]]
    augment = T2.Compose([T2.RandomResizedCrop(256), T2.RandomHorizontalFlip()])
    clf = PretrainedImageClassifier(augment=augment, n_views=2, max_epochs=1, random_state=0, cache_dir=tmp_path)
    first, second = clone(clf), clone(clf)
    first.fit(X, y)
    cached = cache_info(tmp_path)
    assert cached["entries"] == 2 * len(X)  # one entry per image and view
    second.fit(X, y)
    assert cache_info(tmp_path) == cached


# -- clone: torchvision transforms with a static get_params --------------------------------

@pytest.mark.parametrize("augment", [T.RandomResizedCrop(256), T.RandomCrop(200), T.ColorJitter(0.3),
                                     T2.RandomResizedCrop(256)], ids=lambda t: type(t).__name__)
def test_clone_copies_a_transform_whose_get_params_is_not_an_estimators(augment):
    clf = PretrainedImageClassifier(augment=augment, lr=0.01, hidden_units=(8,), module__dropout=0.1)
    copied = clone(clf)
    assert type(copied) is type(clf) and copied.augment is not augment
    assert type(copied.augment) is type(augment) and transform_identity(copied.augment) == transform_identity(augment)
    params, copied_params = clf.get_params(deep=False), copied.get_params(deep=False)
    assert copied_params.keys() == params.keys() and copied_params["module__dropout"] == 0.1
    assert copied.hidden_units == (8,) and copied.lr == 0.01
    # Its get_params draws a crop (or colours): not an estimator's to go into, nor to set.
    assert clf.get_params(deep=True)["augment"] is augment
    assert clf.set_params(lr=0.1).lr == 0.1


def test_clone_keeps_metadata_requests_with_a_transform_augment():
    from sklearn import config_context

    with config_context(enable_metadata_routing=True):
        clf = PretrainedImageClassifier(augment=T.RandomResizedCrop(256)).set_fit_request(sample_weight=True)
        routing = clone(clf).get_metadata_routing()
    assert routing.fit.requests["sample_weight"] is True


def test_grid_search_with_a_torchvision_transform_augment(sample):
    paths, labels = sample
    index = [0, 1, 2, 3, 30, 31, 32, 33]
    X, y = [paths[i] for i in index], labels[index]
    clf = PretrainedImageClassifier(augment=T.RandomResizedCrop(256), n_views=1, max_epochs=1, random_state=0)
    search = GridSearchCV(clf, {"lr": [1e-3, 1e-2]}, cv=2, error_score="raise").fit(X, y)
    assert search.best_estimator_.augment is not clf.augment
    assert search.predict(X).shape == (len(X),)


# -- a failing augment ---------------------------------------------------------------------

def test_a_failing_augment_is_named_at_once_not_taken_for_bad_images(sample):
    paths, labels = sample
    index = [0, 1, 2, 3, 30, 31, 32, 33]
    X, y = [paths[i] for i in index], labels[index]
    calls = []

    def crop(image):  # the photos are 384x288: no 300x300 crop fits
        calls.append(image.size)
        return T.RandomCrop(300)(image)

    clf = PretrainedImageClassifier(augment=crop, n_views=1, max_epochs=1, embed_batch_size=2)
    with pytest.raises(ValueError, match=r"augment=<function .*\.crop> failed on X\[0\] \('.*'\): "
                                         r"ValueError: Required crop size") as error:
        clf.fit(X, y)
    assert not isinstance(error.value, ImageInputError)
    assert len(calls) <= 4  # the batch at hand and the one decoded ahead, not every image
    with pytest.raises(ValueError, match=r"augment=Compose\( RandomCrop\(size=\(300, 300\).*\) failed on X\[0\]"):
        clf.set_params(augment=T.Compose([T.RandomCrop(300)])).fit(X, y)
