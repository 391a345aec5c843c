"""The `sktransfer` command line, run in-process through `main` and as a real console command."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sktransfer import ImageEmbedder, PretrainedImageClassifier, load_image_folder
from sktransfer._cli import _parse_grid, build_parser, main

from conftest import SAMPLE, ForwardCounter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cardboard", "glass", "metal"]


def copy_images(sample, folder, per_class, offset=0):
    """Real photos of the bundled sample copied into ``folder/<class>/``."""
    paths, labels = sample
    for c in CLASSES:
        for p in [p for p, lab in zip(paths, labels) if lab == c][offset:offset + per_class]:
            (folder / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, folder / c / Path(p).name)
    return folder


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory):
    """`sktransfer fit` with a small grid on 3 classes x 6 photos; its stdout and model file."""
    root = tmp_path_factory.mktemp("cli")
    data = copy_images(sample, root / "train", 6)
    model = root / "model.joblib"
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["fit", str(data), "-o", str(model), "--cv", "2", "--max-epochs", "15",
                     "--grid", "dropout=0.0,0.5", "--grid", "hidden_units=(),(8,)"])
    return code, out.getvalue(), model, data, root


def test_grid_values_are_python_literals_or_words():
    grid = _parse_grid(
        ["hidden_units=(),(256,)", "lr=1e-3,0.01", "backbone=resnet18,efficientnet_lite0",
         "class_weight=None,balanced", "optimizer__betas=(0.9, 0.99)"],
        PretrainedImageClassifier(),
    )
    assert grid == {
        "hidden_units": [(), (256,)],
        "lr": [0.001, 0.01],
        "backbone": ["resnet18", "efficientnet_lite0"],
        "class_weight": [None, "balanced"],
        "optimizer__betas": [(0.9, 0.99)],
    }
    for bad in (["lr"], ["lr="], ["lr=0.1,,0.2"], ["learning_rate=0.1"]):
        with pytest.raises(ValueError, match="--grid"):
            _parse_grid(bad, PretrainedImageClassifier())


def test_fit_prints_cv_accuracy_and_chosen_settings_and_saves(trained):
    code, out, model_path, data, _ = trained
    assert code == 0
    assert "2-fold cross-validated accuracy:" in out
    assert "Grid of 4 candidates" in out
    # The best of several candidates, chosen on the folds that scored it, is said to be optimistic.
    headline = next(line for line in out.splitlines() if "cross-validated accuracy" in line)
    assert "the best of 4 candidates, chosen on these folds: optimistic" in headline, headline
    model = joblib.load(model_path)
    assert isinstance(model, PretrainedImageClassifier)
    chosen = out.split("Chosen settings: ")[1].splitlines()[0]
    assert f"dropout={model.dropout!r}" in chosen and f"hidden_units={model.hidden_units!r}" in chosen
    assert model.max_epochs == 15 and list(model.classes_) == CLASSES
    X, y = load_image_folder(data)
    assert model.score(X, y) > 0.8  # refit on all images


def test_fit_from_csv_with_relative_paths(sample, tmp_path):
    data = copy_images(sample, tmp_path / "photos", 4)
    table = tmp_path / "labels.csv"
    X, y = load_image_folder(data)
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "kind"])
        writer.writerows([os.path.relpath(p, tmp_path), label] for p, label in zip(X, y))
    model = tmp_path / "m.joblib"
    code = main(["fit", str(table), "-o", str(model), "--cv", "2", "--max-epochs", "5",
                 "--path-column", "file", "--label-column", "kind"])
    assert code == 0
    assert list(joblib.load(model).classes_) == CLASSES


def test_a_csv_separated_by_semicolons_or_tabs_is_read_as_its_header_says(sample, tmp_path, capsys):
    # Spreadsheets in many locales export CSV with ';': its header names the columns with it.
    data = copy_images(sample, tmp_path / "photos", 4)
    X, y = load_image_folder(data)
    for name, delimiter in [("semi.csv", ";"), ("tabs.csv", "\t")]:
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["path", "label"])
            writer.writerows([os.path.relpath(p, tmp_path), label] for p, label in zip(X, y))
        assert main(["fit", str(tmp_path / name), "--cv", "2", "-o", str(tmp_path / "m.joblib")]) == 0
        assert capsys.readouterr().out.startswith("12 images, 3 classes: cardboard (4), glass (4), metal (4)\n")
    (tmp_path / "odd.csv").write_text("file;cls\n")
    assert main(["fit", str(tmp_path / "odd.csv"), "-o", str(tmp_path / "m.joblib")]) == 1
    assert "has no column(s) 'path', 'label'; its columns are ['file', 'cls']" in capsys.readouterr().err


def test_evaluate_names_its_option_for_a_bad_top(trained, tmp_path, capsys):
    _, _, model, data, _ = trained
    assert main(["evaluate", str(model), str(data), "-o", str(tmp_path / "r"), "--top", "0"]) == 1
    assert capsys.readouterr().err == ("sktransfer evaluate: error: --top 0: the number of misclassified images "
                                       "shown must be at least 1.\n")
    assert not (tmp_path / "r").exists()


def test_data_that_does_not_exist_is_called_missing(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope"), "-o", str(tmp_path / "m.joblib")]) == 1
    assert capsys.readouterr().err == (f"sktransfer fit: error: {str(tmp_path / 'nope')!r} does not exist; expected "
                                       "a folder with one sub-folder of images per class, or a CSV file with "
                                       "columns path,label.\n")


def test_fit_that_cannot_write_its_model_leaves_the_previous_one(sample, tmp_path, capsys):
    """The model file is replaced whole or not at all: here the disk refuses a file over 1 MB."""
    import resource

    data = copy_images(sample, tmp_path / "d", 2)
    previous = tmp_path / "m.joblib"
    previous.write_bytes(b"the previous model")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        code = main(["fit", str(data), "--cv", "2", "--max-epochs", "2", "--engine", "torch", "-o", str(previous)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1 and "File too large" in capsys.readouterr().err
    assert previous.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.joblib"]  # no temporary file left


def test_fit_rejects_bad_settings_and_data_before_training(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "d", 2)
    assert main(["fit", str(data), "--grid", "learning_rate=0.1", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sktransfer fit: error: --grid 'learning_rate=0.1'") and "lr" in err
    assert main(["fit", str(data), "--cv", "3"]) == 1
    assert "fewer than --cv 3" in capsys.readouterr().err
    # A setting the classifier refuses is named as the option that gave it.
    assert main(["fit", str(data), "--cv", "2", "--random-state", "-5", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sktransfer fit: error: --random-state -5: ") and "--max-epochs" not in err
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(["fit", str(data), "--cv", "2", "--cache-dir", str(tmp_path / "notes.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sktransfer fit: error: --cache-dir {tmp_path / 'notes.txt'} is a file, not a folder"), err
    assert "warning" not in err
    # With a grid too: the setting is the command's, not a candidate's.
    assert main(["fit", str(data), "--cv", "2", "--grid", "dropout=0.0,0.5", "--cache-dir",
                 str(tmp_path / "notes.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sktransfer fit: error: --cache-dir {tmp_path / 'notes.txt'} is a file"), err
    (data / "cardboard" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["fit", str(data), "--cv", "2", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "not an image file" in err
    assert not (tmp_path / "m.joblib").exists()
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_text("path,class\na.jpg,x\n")
    assert main(["fit", str(bad_csv)]) == 1
    assert "no column(s) 'label'" in capsys.readouterr().err
    bad_csv.write_text("path,label\na.jpg,x\nb.jpg,\n")
    assert main(["fit", str(bad_csv)]) == 1
    assert "line(s) [3] have an empty path or label" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["fit", str(data), "--cv", "five"])
    assert usage.value.code == 2


def test_predict_one_row_per_input_in_input_order(trained, sample, tmp_path, capsys):
    _, _, model_path, _, _ = trained
    unseen = copy_images(sample, tmp_path / "new", 2, offset=20)
    single = sample[0][-1]  # a photo of another class, given as a file
    assert main(["predict", str(model_path), str(unseen), single, "--proba", "-o", str(tmp_path / "p.csv")]) == 0
    assert capsys.readouterr().out == f"7 predictions written to {tmp_path / 'p.csv'}\n"
    table = pd.read_csv(tmp_path / "p.csv")
    expected_paths = sorted(str(p) for p in unseen.rglob("*.jpg")) + [single]
    assert table["path"].tolist() == expected_paths
    model = joblib.load(model_path)
    np.testing.assert_array_equal(table["prediction"], model.predict(expected_paths))
    proba = table[[f"proba_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba, model.predict_proba(expected_paths), atol=1e-6)
    assert main(["predict", str(model_path), single]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "path,prediction" and lines[1] == f"{single},{model.predict([single])[0]}"
    assert captured.err == ""  # no progress bar when stderr is not a terminal


def test_backbone_errors_name_the_options_as_typed(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "photos", 2)
    assert main(["embed", str(data), "-o", str(tmp_path / "x.npy"), "--backbone", "resnet18", "--weights", "None"]) == 1
    err = capsys.readouterr().err
    assert "--weights None is not a weights name of 'resnet18'" in err, err
    assert ", None," not in err  # the command line cannot give None
    assert main(["fit", str(data), "--cv", "2", "--backbone", "resnet_18", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert "--backbone resnet_18 is not a known backbone" in err and "sktransfer backbones" in err, err
    assert "list_backbones()" not in err and "torch.nn.Module" not in err


def test_evaluate_names_a_multi_label_model(sample, tmp_path, capsys):
    paths, labels = sample[0][::15], sample[1][::15]
    indicator = np.array([[label == "glass", label != "metal"] for label in labels], dtype=int)
    joblib.dump(PretrainedImageClassifier(max_epochs=2, random_state=0).fit(paths, indicator), tmp_path / "ml.joblib")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ml.joblib"), str(SAMPLE), "-o", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert "multi-label" in err and "labels the model does not know" not in err, err
    assert not (tmp_path / "report").exists()


def test_predict_with_a_regressor_writes_its_numbers(sample, tmp_path, capsys):
    from sktransfer import PretrainedImageRegressor, save_model

    paths = sample[0][::12]
    grey = np.array([np.asarray(Image.open(p).convert("L"), dtype=float).mean() for p in paths])
    single = PretrainedImageRegressor(max_epochs=5, random_state=0).fit(paths, grey)
    joblib.dump(single, tmp_path / "grey.joblib")
    save_model(single, tmp_path / "grey_folder")
    for model in (tmp_path / "grey.joblib", tmp_path / "grey_folder"):
        assert main(["predict", str(model), *paths[:3], "-o", str(tmp_path / "p.csv")]) == 0
        table = pd.read_csv(tmp_path / "p.csv")
        assert table.columns.tolist() == ["path", "prediction"] and table["path"].tolist() == paths[:3]
        np.testing.assert_allclose(table["prediction"], single.predict(paths[:3]), rtol=1e-6)
    two = PretrainedImageRegressor(max_epochs=5, random_state=0).fit(paths, np.c_[grey, -grey])
    joblib.dump(two, tmp_path / "two.joblib")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "two.joblib"), *paths[:3]]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert table.columns.tolist() == ["path", "prediction_0", "prediction_1"]
    np.testing.assert_allclose(table[["prediction_0", "prediction_1"]], two.predict(paths[:3]), rtol=1e-6)
    assert main(["predict", str(tmp_path / "grey.joblib"), *paths[:3], "--proba"]) == 1
    err = capsys.readouterr().err
    assert "--proba" in err and "PretrainedImageRegressor" in err and "classifier" in err, err
    # A model that does not predict (an embedder) is told as such, not with a traceback.
    from sktransfer import ImageEmbedder

    save_model(ImageEmbedder().fit(), tmp_path / "embedder")
    assert main(["predict", str(tmp_path / "embedder"), *paths[:3]]) == 1
    assert capsys.readouterr().err == (f"sktransfer predict: error: {str(tmp_path / 'embedder')!r} holds a "
                                       "ImageEmbedder, which does not predict (it has no predict method).\n")


def test_predict_to_dev_stdout_writes_only_the_csv_there(trained, sample, tmp_path):
    # `-o /dev/stdout | cat`: the table goes down the pipe; the line saying so goes to stderr.
    _, _, model, _, _ = trained
    photos = sample[0][:2]
    run = subprocess.run([sys.executable, "-m", "sktransfer", "predict", str(model), *photos, "-o", "/dev/stdout"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(io.StringIO(run.stdout))
    assert table.columns.tolist() == ["path", "prediction"] and table["path"].tolist() == photos
    assert "2 predictions written to /dev/stdout" in run.stderr


def test_fit_to_a_folder_a_killed_save_left_holding_only_tensor_files(trained, tmp_path):
    from sktransfer import load_model, save_model

    _, _, model, data, _ = trained
    folder = tmp_path / "m"
    save_model(joblib.load(model), folder)
    (folder / "model.json").unlink()  # as a save killed before its model.json
    assert main(["fit", str(data), "--cv", "2", "--max-epochs", "2", "-o", str(folder) + "/"]) == 0
    load_model(folder)


class _Planted:
    """A pickle that, when loaded, runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_messages_name_options_as_typed(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "d", 3)
    assert main(["fit", str(data), "-o", str(tmp_path / "m.joblib"), "--cv", "2", "--device", "cdua"]) == 1
    err = capsys.readouterr().err
    assert "--device cdua" in err and "device=" not in err, err
    assert main(["audit", str(data), "-o", str(tmp_path / "a"), "--cv", "20"]) == 1
    err = capsys.readouterr().err
    assert "--cv 20" in err and "cv=" not in err, err
    one = copy_images(sample, tmp_path / "one", 3)
    for c in CLASSES[1:]:
        shutil.rmtree(one / c)
    for command in (["fit", str(one), "-o", str(tmp_path / "m.joblib"), "--cv", "2"],
                    ["audit", str(one), "-o", str(tmp_path / "a"), "--cv", "2"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert f"{str(one)!r} has images of a single class ('cardboard')" in err, err
    assert main(["audit", str(data), "-o", str(tmp_path / "a"), "--test", str(data / "glass")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sktransfer audit: error: --test "), err


def test_only_files_named_as_pickles_are_unpickled(trained, tmp_path, capsys):
    # A file swapped in for a shared save_model folder (a name without extension), or
    # any other file given as the model, is refused before anything is unpickled.
    _, _, model_path, data, _ = trained
    marker = tmp_path / "ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("model", "model.bin", "labels.csv"):
        joblib.dump(_Planted(str(marker)), shared / name)
        for command in (["predict", str(shared / name), str(data)],
                        ["evaluate", str(shared / name), str(data), "-o", str(tmp_path / "report")],
                        ["export", str(shared / name), str(tmp_path / "m.onnx")]):
            assert main(command) == 1
            err = capsys.readouterr().err
            assert f"{str(shared / name)!r} is neither a save_model folder nor a joblib file" in err, err
            assert ".joblib, .pkl or .pickle" in err
            assert not marker.exists()
    # A CSV given where the model goes (the arguments swapped) is told as such, not by pickle's errors.
    (tmp_path / "labels.csv").write_text("path,label\nx.jpg,glass\n")
    assert main(["evaluate", str(tmp_path / "labels.csv"), str(model_path)]) == 1
    err = capsys.readouterr().err
    assert "is neither a save_model folder nor a joblib file" in err and "int()" not in err, err
    # Named as a pickle, a file is loaded (a joblib file runs code: trusted sources only).
    joblib.dump(joblib.load(model_path), tmp_path / "copy.pkl")
    assert main(["predict", str(tmp_path / "copy.pkl"), str(data / "glass")]) == 0
    # What fit writes, it can load: a model file's name must say it is a pickle.
    assert main(["fit", str(data), "-o", str(tmp_path / "model.bin")]) == 1
    err = capsys.readouterr().err
    assert "-o " in err and ".joblib, .pkl or .pickle" in err, err
    assert not (tmp_path / "model.bin").exists()


def test_predict_errors_name_the_input(trained, tmp_path, capsys):
    _, _, model_path, data, _ = trained
    assert main(["predict", str(model_path), str(tmp_path / "missing.jpg"), str(model_path)]) == 1
    err = capsys.readouterr().err
    assert "missing.jpg': file not found" in err and "model.joblib': not an image file" in err
    # In the command line's words: files, not Python objects.
    assert err.startswith("sktransfer predict: error: 2 file(s) cannot be used as images:\n")
    assert "input(s) of X" not in err and "PIL images" not in err and "uint8 arrays" not in err
    assert main(["predict", str(tmp_path / "none.joblib"), str(data)]) == 1
    assert "none.joblib' does not exist" in capsys.readouterr().err
    photo = next(data.rglob("*.jpg"))
    assert main(["predict", str(photo), str(photo)]) == 1
    assert "is neither a save_model folder nor a joblib file" in capsys.readouterr().err
    (tmp_path / "text.joblib").write_text("path,label\n")  # named as one, but no pickle
    assert main(["predict", str(tmp_path / "text.joblib"), str(photo)]) == 1
    assert "is not a model saved by sktransfer fit" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(model_path), str(tmp_path / "empty")]) == 1
    assert "is a folder with no image files" in capsys.readouterr().err
    assert main(["predict", str(model_path), str(tmp_path / "nowhere") + "/"]) == 1
    assert capsys.readouterr().err.endswith(f"folder {str(tmp_path / 'nowhere') + '/'!r} not found.\n")


def test_evaluate_writes_metrics_pictures_and_html(trained, sample, tmp_path):
    _, _, model_path, _, _ = trained
    data = copy_images(sample, tmp_path / "test", 5, offset=10)
    # A metal photo filed as cardboard: a mistake the report has to show.
    shutil.copy(next((data / "metal").iterdir()), data / "cardboard" / "zz_filed_wrong.jpg")
    report = tmp_path / "report"
    assert main(["evaluate", str(model_path), str(data), "-o", str(report), "--top", "4"]) == 0

    model = joblib.load(model_path)
    X, y = load_image_folder(data)
    predicted = model.predict(X)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_images"] == 16 and metrics["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert metrics["classes"] == CLASSES
    recall = np.mean(predicted[y == "cardboard"] == "cardboard")
    assert metrics["per_class"]["cardboard"]["recall"] == pytest.approx(recall)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 16
    assert "precision" in (report / "report.txt").read_text()

    with Image.open(report / "confusion_matrix.png") as im:
        im.load()
        assert im.size == (500, 500)  # 5 x 5 inches at 100 dpi
    with Image.open(report / "top_losses.png") as im:
        im.load()
        assert im.size == (600, 660)  # 2 x 2 cells of 3 x 3.3 inches at 100 dpi
        assert np.asarray(im.convert("L")).std() > 10  # photos, not a blank canvas
    page = (report / "index.html").read_text()
    assert 'src="confusion_matrix.png"' in page and 'src="top_losses.png"' in page
    wrong = [p for p, t, q in zip(X, y, predicted) if t != q]
    assert wrong  # the misfiled photo at least gives the report something to show
    proba = model.predict_proba(X)
    loss = -np.log(proba[np.arange(len(y)), np.searchsorted(model.classes_, y)])
    most_wrong = [X[i] for i in np.argsort(-loss) if predicted[i] != y[i]][:4]
    for path in most_wrong:  # the most confidently wrong images are the ones shown, linked from the report
        assert path in page and f'href="{urllib.parse.quote(os.path.relpath(path, report))}"' in page


def test_evaluate_without_a_mistake_shows_no_picture_of_mistakes(trained, sample, tmp_path):
    _, _, model_path, _, _ = trained
    model = joblib.load(model_path)
    data = copy_images(sample, tmp_path / "right", 4)  # photos it was trained on
    X, y = load_image_folder(data)
    for path, wrong in zip(X, model.predict(X) != y):
        if wrong:
            os.remove(path)
    report = tmp_path / "report"
    report.mkdir()
    (report / "top_losses.png").write_bytes(b"an earlier report's mistakes")
    assert main(["evaluate", str(model_path), str(data), "-o", str(report)]) == 0
    assert not (report / "top_losses.png").exists()
    page = (report / "index.html").read_text()
    assert "top_losses.png" not in page and "No image is misclassified." in page


def test_evaluate_averages_only_the_classes_in_the_data_or_predicted(trained, sample, tmp_path):
    # A test folder holding some of the model's classes: a class neither in the data nor
    # predicted has no recall to average (scikit-learn's classification_report leaves it out).
    from sklearn.metrics import classification_report

    _, _, model_path, _, _ = trained
    model = joblib.load(model_path)
    data = copy_images(sample, tmp_path / "some", 6)  # the photos it was trained on
    shutil.rmtree(data / "cardboard")
    X, y = load_image_folder(data)
    predicted = model.predict(X)
    assert "cardboard" not in predicted  # so cardboard is neither in the data nor predicted
    expected = classification_report(y, predicted, output_dict=True, zero_division=0)
    report = tmp_path / "report"
    assert main(["evaluate", str(model_path), str(data), "-o", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["classes"] == CLASSES  # the model's
    present = sorted(set(y) | set(predicted))
    assert sorted(metrics["per_class"]) == present
    for c in present:
        assert metrics["per_class"][c]["recall"] == pytest.approx(expected[c]["recall"])
    assert metrics["macro_avg"]["recall"] == pytest.approx(expected["macro avg"]["recall"])
    assert "cardboard" not in (report / "report.txt").read_text()
    assert len(metrics["confusion_matrix"]) == len(CLASSES)  # the whole matrix, every class of the model


def test_embed_to_npy_and_parquet_matches_the_embedder(sample, tmp_path):
    data = copy_images(sample, tmp_path / "imgs", 2)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    expected = ImageEmbedder().fit_transform(paths)
    assert main(["embed", str(data), "-o", str(tmp_path / "f.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected, atol=1e-5)
    assert (tmp_path / "f.paths.txt").read_text().splitlines() == paths
    assert main(["embed", *paths[:3], "-o", str(tmp_path / "f.parquet")]) == 0
    frame = pd.read_parquet(tmp_path / "f.parquet")
    assert frame["path"].tolist() == paths[:3] and frame.shape == (3, 1 + 1280)
    np.testing.assert_allclose(frame.drop(columns="path").to_numpy(), expected[:3], atol=1e-5)
    assert main(["embed", str(data), "-o", str(tmp_path / "f.csv")]) == 1


def test_a_folder_given_is_read_through_linked_folders_and_its_broken_links_are_told(sample, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(sample[0][0], elsewhere / "b.jpg")
    data = tmp_path / "imgs"
    data.mkdir()
    shutil.copy(sample[0][1], data / "a.jpg")
    (data / "linked").symlink_to(elsewhere)
    (data / "c.jpg").symlink_to(tmp_path / "missing.jpg")
    assert main(["embed", str(data), "-o", str(tmp_path / "f.npy")]) == 0
    assert re.search(r"warning: skipped 1 file in .*: 1 broken link .*c\.jpg", capsys.readouterr().err)
    assert (tmp_path / "f.paths.txt").read_text().splitlines() == [str(data / "a.jpg"), str(data / "linked" / "b.jpg")]
    assert np.load(tmp_path / "f.npy").shape == (2, 1280)


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_files_a_folder_holds_that_are_not_images_are_told_not_dropped_silently(trained, tmp_path, capsys, command):
    _, _, model, data, _ = trained
    folder = tmp_path / "photos"
    shutil.copytree(data / "glass", folder)
    (folder / "notes.txt").write_text("taken on Monday")
    (folder / "scan.heic").write_bytes(b"")
    args = [str(model), str(folder), "-o", str(tmp_path / "out.csv")] if command == "predict" else [
        str(folder), "-o", str(tmp_path / "out.npy")]
    assert main([command, *args]) == 0
    err = capsys.readouterr().err
    assert f"sktransfer {command}: warning: skipped 2 files in {str(folder)!r}" in err, err
    assert "'.txt': 1" in err and "'.heic': 1" in err, err


def test_warnings_are_told_in_the_command_lines_words_not_pythons(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "d", 2)
    (data / "glass" / "notes.txt").write_text("taken on Monday")
    assert main(["fit", str(data), "--cv", "2", "-o", str(tmp_path / "m.joblib")]) == 0
    err = capsys.readouterr().err
    assert "sktransfer fit: warning: " in err and "notes.txt" in err, err
    assert "UserWarning" not in err and "warnings.warn(" not in err and ".py:" not in err, err


def test_grid_candidates_a_training_fold_cannot_take_are_refused_before_any_image_is_read(sample, tmp_path, capsys):
    from sktransfer._backbones import build_backbone

    data = copy_images(sample, tmp_path / "d", 8)  # 24 photos: 3 held out of all, 2 of a training fold
    with ForwardCounter(build_backbone("efficientnet_lite0").module) as counter:
        assert main(["fit", str(data), "--cv", "3", "--grid", "calibration=None,'temperature'",
                     "-o", str(tmp_path / "m.joblib")]) == 1
    assert counter.images == 0
    err = capsys.readouterr().err
    assert "--grid candidate calibration='temperature'" in err and "a training fold of --cv 3" in err, err
    assert "2 images held out for 3 classes" in err, err


def test_embed_to_npy_refuses_file_names_with_a_line_break(sample, tmp_path, capsys):
    # The list of paths beside a .npy has one path per line: a name with a line break
    # would shift every later path against its row. Refused before any embedding.
    data = tmp_path / "imgs"
    data.mkdir()
    plain, broken, carriage = data / "a.jpg", data / "b\nc.jpg", data / "d\re.jpg"
    for i, path in enumerate((plain, broken, carriage)):
        shutil.copy(sample[0][i], path)
    assert main(["embed", str(data), "-o", str(tmp_path / "f.npy")]) == 1
    err = capsys.readouterr().err
    assert repr(str(broken)) in err and repr(str(carriage)) in err and ".parquet" in err
    assert repr(str(plain)) not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # nothing written
    assert main(["embed", str(data), "-o", str(tmp_path / "f.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "f.parquet")["path"].tolist() == [str(plain), str(broken), str(carriage)]
    capsys.readouterr()


def test_weights_from_a_file_work_offline(sample, tmp_path, capsys):
    """--weights path.pth: a torchvision backbone whose weights were fetched elsewhere (here: made up)."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    paths = sample[0][:2]
    assert main(["embed", *paths, "--backbone", "resnet18", "--weights", str(tmp_path / "resnet18.pth"),
                 "--engine", "torch", "-o", str(tmp_path / "f.npy")]) == 0
    expected = ImageEmbedder("resnet18", weights=str(tmp_path / "resnet18.pth"), engine="torch").fit_transform(paths)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected, atol=1e-5)
    data = copy_images(sample, tmp_path / "d", 2)
    assert main(["fit", str(data), "--cv", "2", "--weights", str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err
    assert build_parser().parse_args(["audit", "x", "--weights", "w.pth", "--engine", "torch"]).weights == "w.pth"


def test_backbones_lists_offline_weights_feature_size_and_cost(capsys):
    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert rows["efficientnet_lite0"][1:3] == ["yes", "1280"]
    resnet18 = rows["resnet18"]
    on_disk = os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", "resnet18-f37072fd.pth"))
    assert resnet18[1] == ("yes" if on_disk else "no")
    assert resnet18[2] == "512" and float(resnet18[3]) == pytest.approx(11.2, abs=0.1)
    assert float(resnet18[4]) == pytest.approx(1.814)

    assert main(["backbones", "--offline"]) == 0
    offline = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    offline.pop("Weights")  # the closing note
    assert offline == {name: row for name, row in rows.items() if row[1] == "yes"}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(offline)


def test_fit_help_states_the_classifiers_default_epochs(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: the classifier's, {PretrainedImageClassifier().max_epochs})" in text


def test_help_version_and_usage_errors_answer_before_torch_loads():
    """`sktransfer --help`, a command's help, --version and a usage error need none of
    the seconds that torch, scikit-learn and skorch take to import."""
    code = ("import sys\n"
            "from sktransfer._cli import main\n"
            "for argv in (['--help'], ['fit', '--help'], ['predict', '--help'], ['--version'], ['predict']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'skorch', 'openvino') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: sktransfer predict" in done.stderr and "{auto,torch,openvino}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_misspelt_option_is_told_with_its_commands_usage(capsys):
    for argv in (["backbones", "--ofline"], ["fit", "photos/", "--outptu", "x"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert f"usage: sktransfer {argv[0]} " in err
        assert f"sktransfer {argv[0]}: error: unrecognized arguments: {' '.join(argv[2 if argv[0] == 'fit' else 1:])}" in err


def test_help_everywhere():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "fit", "predict", "evaluate", "embed", "export", "audit", "backbones"}
    for name in [None, *commands]:
        with pytest.raises(SystemExit) as done:
            main(["--help"] if name is None else [name, "--help"])
        assert done.value.code == 0


@pytest.mark.slow
def test_console_command_exit_codes(trained):
    """The installed entry point, as a user's shell runs it."""
    _, _, model_path, data, _ = trained
    photo = str(next(data.rglob("*.jpg")))
    cmd = [sys.executable, "-m", "sktransfer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # stderr on a real terminal: a progress bar there, and only the CSV on stdout.
    import fcntl
    import pty
    import struct
    import termios

    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns, as a shell's
    ok = subprocess.run(cmd + ["predict", str(model_path), photo], stdout=subprocess.PIPE, stderr=stderr,
                        text=True, env=env)
    os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert ok.returncode == 0, shown.decode(errors="replace")
    assert ok.stdout.splitlines() == ["path,prediction", f"{photo},{joblib.load(model_path).predict([photo])[0]}"]
    assert b"embedding images" in shown and b"100%" in shown
    failed = subprocess.run(cmd + ["predict", str(model_path), "missing.jpg"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("sktransfer predict: error:") and "Traceback" not in failed.stderr


def test_usage_errors_exit_2_with_usage(capsys):
    for argv in (["predict"], ["fit"], ["nonsense"], ["embed", "x.jpg"]):
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2
        assert "usage: sktransfer" in capsys.readouterr().err


def _labelled_model(sample, tmp_path, labels):
    """A classifier trained (briefly) on photos filed under the given class names."""
    data = tmp_path / "odd"
    paths, y = sample
    for label, cls in zip(labels, CLASSES):
        (data / label).mkdir(parents=True)
        for p in [p for p, lab in zip(paths, y) if lab == cls][:3]:
            shutil.copy(p, data / label / Path(p).name)
    X, y = load_image_folder(data)
    model = PretrainedImageClassifier(max_epochs=2, random_state=0).fit(X, y)
    joblib.dump(model, tmp_path / "odd.joblib")
    return tmp_path / "odd.joblib", data


def test_csv_cells_that_would_run_as_formulas_are_neutralised(sample, tmp_path, monkeypatch):
    labels = ["=HYPERLINK(\"x\")", "+1+cmd", "@SUM(A1)"]
    model, data = _labelled_model(sample, tmp_path, labels)
    monkeypatch.chdir(tmp_path)
    shutil.copy(sample[0][0], "=1+2.jpg")  # given as a relative path, so the cell starts with '='
    assert main(["predict", str(model), "=1+2.jpg", str(data), "--proba", "-o", "p.csv"]) == 0
    with open("p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    cells = [c for row in rows for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")]
    assert rows[1][0] == "'=1+2.jpg" and {"'" + lab for lab in labels} & set(cells)
    assert all(float(c) >= 0 for row in rows[1:] for c in row[2:])  # numbers stay numbers
    assert rows[0][2:] == [f"proba_{lab}" for lab in sorted(labels)]


def test_file_names_that_are_not_utf8_are_written_whole(sample, tmp_path, trained, capsys):
    _, _, model_path, _, _ = trained
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(sample[0][0], odd)
    assert main(["predict", str(model_path), str(odd), "-o", str(tmp_path / "p.csv")]) == 0
    table = pd.read_csv(tmp_path / "p.csv")  # valid UTF-8
    assert table["path"].tolist() == [str(tmp_path / "caf\\xe9.jpg")]
    assert main(["embed", str(odd), sample[0][1], "-o", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.npy").shape == (2, 1280)
    assert (tmp_path / "f.paths.txt").read_text(encoding="utf-8").splitlines() == \
        [str(tmp_path / "caf\\xe9.jpg"), sample[0][1]]
    # evaluate's page links each misclassified photo, whatever bytes its name holds.
    data = tmp_path / "data"
    for c in ("glass", "metal"):
        (data / c).mkdir(parents=True)
    shutil.copy(sample[0][0], data / "glass" / os.fsdecode(b"caf\xe9.jpg"))  # a cardboard photo filed as glass
    shutil.copy(sample[0][40], data / "metal" / "m.jpg")
    assert main(["evaluate", str(model_path), str(data), "-o", str(tmp_path / "report")]) == 0
    assert 'href="../data/glass/caf%E9.jpg"' in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    capsys.readouterr()


def test_failed_predict_leaves_the_previous_output_in_place(trained, tmp_path):
    _, _, model_path, _, _ = trained
    out = tmp_path / "p.csv"
    out.write_text("earlier results\n")
    assert main(["predict", str(model_path), str(tmp_path / "missing.jpg"), "-o", str(out)]) == 1
    assert out.read_text() == "earlier results\n" and not list(tmp_path.glob(".tmp-*"))


def test_evaluate_draws_class_names_with_dollar_signs_as_text(sample, tmp_path):
    model, data = _labelled_model(sample, tmp_path, ["$\\notacommand$", "price $5", "tulip"])
    report = tmp_path / "report"
    assert main(["evaluate", str(model), str(data), "-o", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    mistakes = ["top_losses.png"] if metrics["accuracy"] < 1 else []  # a picture of mistakes where there are any
    assert sorted(p.name for p in report.iterdir()) == [
        "confusion_matrix.png", "index.html", "metrics.json", "report.txt", *mistakes]
    assert "$\\notacommand$" in metrics["classes"]


def _model_files(folder):
    """The files of a save_model folder, sorted, each tensor file under its part's name (head.pt)."""
    return sorted(re.sub(r"-[0-9a-f]{32}\.pt$", ".pt", name) for name in os.listdir(folder))


def test_predict_and_evaluate_take_the_safe_save_model_folder(trained, sample, tmp_path, capsys):
    _, _, model_path, data, _ = trained
    folder = str(tmp_path / "shared") + os.sep
    assert main(["fit", str(data), "-o", folder, "--cv", "2", "--max-epochs", "2"]) == 0
    assert _model_files(folder) == ["backbone.pt", "head.pt", "model.json"]
    assert main(["predict", folder, str(data), "-o", str(tmp_path / "p.csv")]) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    from sktransfer import load_model

    np.testing.assert_array_equal(table["prediction"], load_model(folder).predict(table["path"].tolist()))
    assert main(["evaluate", folder, str(data), "-o", str(tmp_path / "report")]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_demo_shows_accuracy_time_confusion_matrix_and_next_steps(tmp_path, capsys):
    model = tmp_path / "demo.joblib"
    assert main(["demo", "-o", str(model)]) == 0
    out = capsys.readouterr().out
    assert "Bundled sample: 180 camera photos" in out
    accuracy = re.search(r"5-fold cross-validated accuracy: (0\.\d{3}) ± (0\.\d{3}) \(folds( \d\.\d\d){5}\)", out)
    assert accuracy and float(accuracy.group(1)) > 0.5  # six classes: chance is 0.17
    assert re.search(r"180 photos through the backbone and 5 heads trained in [\d.]+ s \([\d.]+ images/s\)", out)
    classes = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
    lines = out[out.index("Confusion matrix"):].splitlines()
    assert lines[1].split() == classes  # predicted classes across
    rows = [line.split() for line in lines[2:8]]
    assert [row[0] for row in rows] == classes  # true classes down
    counts = np.array([[int(n.strip("[]")) if n != "." else 0 for n in row[1:]] for row in rows])
    assert counts.sum() == 180 and (counts.sum(axis=1) == 30).all()  # every photo once, out of fold
    assert all(rows[i][1 + i].startswith("[") for i in range(6))  # the diagonal is marked
    assert np.trace(counts) / 180 == pytest.approx(float(accuracy.group(1)), abs=0.02)  # equal folds of 36
    assert f"saved to {model.resolve()}" in out and "predictions identical = True" in out
    assert "sktransfer fit path/to/photos -o model/" in out  # the safe folder, the one to share
    assert list(joblib.load(model).classes_) == classes
    folder = str(tmp_path / "demo_model") + os.sep  # as fit -o: the safe save_model folder
    assert main(["demo", "-o", folder]) == 0
    assert "predictions identical = True" in capsys.readouterr().out
    assert _model_files(folder) == ["backbone.pt", "head.pt", "model.json"]


def test_version_prints_the_package_version(capsys):
    import sktransfer

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"sktransfer {sktransfer.__version__}\n"


def test_audit_threshold_that_is_not_a_number_reads_well(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["audit", "photos", "--threshold", "high"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threshold: 'high' is neither auto nor a number" in err and "lambda" not in err
    assert build_parser().parse_args(["audit", "p", "--threshold", "0.9"]).threshold == 0.9


def test_too_few_images_for_the_folds_names_the_class_as_plain_text(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "few", 2)
    assert main(["fit", str(data), "--cv", "5", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert "class 'cardboard' has 2 images, fewer than --cv 5" in err and "np." not in err
    assert main(["audit", str(data), "--cv", "5", "-o", str(tmp_path / "audit")]) == 1
    err = capsys.readouterr().err
    assert "class 'cardboard' has 2 image(s), fewer than --cv 5" in err and "np." not in err
    assert err.rstrip().endswith("lower --cv."), err
    assert main(["audit", str(data), "--random-state", "-5", "-o", str(tmp_path / "audit")]) == 1
    assert capsys.readouterr().err.startswith("sktransfer audit: error: --random-state -5: ")


def test_export_of_a_pipeline_is_an_error_message_not_a_traceback(trained, tmp_path, capsys):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    _, _, model_path, data, _ = trained
    X, y = load_image_folder(data)
    pipe = make_pipeline(FunctionTransformer(), joblib.load(model_path)).fit(X, y)
    joblib.dump(pipe, tmp_path / "pipe.joblib")
    assert main(["export", str(tmp_path / "pipe.joblib"), str(tmp_path / "p.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sktransfer export: error: export_onnx exports a fitted") and "got Pipeline" in err
    assert not (tmp_path / "p.onnx").exists()


def test_outputs_are_checked_before_any_work(trained, sample, tmp_path, capsys):
    """A path that cannot be written fails at once, naming the path the user gave."""
    _, _, model_path, data, _ = trained
    photo = str(next(data.rglob("*.jpg")))
    (tmp_path / "afile").write_text("a file in the way")
    blocked = str(tmp_path / "afile" / "sub" / "out")  # its parent is a file
    runs = {
        "fit": ["fit", str(tmp_path / "no-such-data"), "-o", blocked + ".joblib"],
        "predict": ["predict", str(tmp_path / "no-such-model.joblib"), photo, "-o", blocked + ".csv"],
        "embed": ["embed", str(tmp_path / "missing.jpg"), "-o", blocked + ".npy"],
        "export": ["export", str(tmp_path / "no-such-model.joblib"), blocked + ".onnx"],
        "evaluate": ["evaluate", str(tmp_path / "no-such-model.joblib"), str(data), "-o", str(tmp_path / "afile")],
        "audit": ["audit", str(tmp_path / "no-such-data"), "-o", str(tmp_path / "afile")],
        "demo": ["demo", "-o", blocked + ".joblib"],
    }
    for command, argv in runs.items():
        assert main(argv) == 1, command
        err = capsys.readouterr().err
        # the output is refused, before the missing inputs are even read
        assert err.startswith(f"sktransfer {command}: error: "), err
        assert str(tmp_path / "afile") in err and ".tmp" not in err and "no-such" not in err, err
    assert main(["predict", str(model_path), photo, "-o", str(tmp_path)]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "linked.csv").symlink_to(blocked + ".csv")  # an output named by a link is written where it points
    assert main(["predict", str(tmp_path / "no-such-model.joblib"), photo, "-o", str(tmp_path / "linked.csv")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "afile") in err and "no-such" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "linked.csv"]  # nothing written


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc here")
def test_an_output_where_no_file_can_be_made_is_refused_before_any_work(tmp_path, capsys):
    """Also for root, whom the permission bits let write anywhere: /proc takes no new
    file, as a read-only mount takes none."""
    for argv in (["embed", str(tmp_path / "missing.jpg"), "-o", "/proc/sktransfer-features.npy"],
                 ["audit", str(tmp_path / "no-such-data"), "-o", "/proc/sktransfer-audit"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"sktransfer {argv[0]}: error: -o '{argv[-1]}'"), err
        assert "/proc" in err and "missing" not in err and "no-such" not in err, err


def test_missing_output_folders_are_made(trained, sample, tmp_path, capsys):
    _, _, model_path, data, _ = trained
    photo = str(next(data.rglob("*.jpg")))
    few = copy_images(sample, tmp_path / "few", 2)
    assert main(["fit", str(few), "--cv", "2", "--max-epochs", "2", "-o", str(tmp_path / "a" / "m.joblib")]) == 0
    assert joblib.load(tmp_path / "a" / "m.joblib").classes_.tolist() == CLASSES
    assert main(["predict", str(model_path), photo, "-o", str(tmp_path / "b" / "sub" / "out.csv")]) == 0
    assert pd.read_csv(tmp_path / "b" / "sub" / "out.csv")["path"].tolist() == [photo]
    assert main(["embed", photo, "-o", str(tmp_path / "c" / "f.npy")]) == 0
    assert np.load(tmp_path / "c" / "f.npy").shape == (1, 1280)
    assert (tmp_path / "c" / "f.paths.txt").read_text().splitlines() == [photo]
    capsys.readouterr()


def test_a_trailing_slash_decides_the_output_at_once(trained, tmp_path, capsys):
    """A file output ending in / is refused before any work; a model output ending in / is a folder."""
    _, _, model_path, data, _ = trained
    photo = str(next(data.rglob("*.jpg")))
    newout = str(tmp_path / "newout") + os.sep
    assert main(["predict", str(tmp_path / "no-such-model.joblib"), photo, "-o", newout]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sktransfer predict: error: -o {newout!r} ends in '/', a folder; give a file name")
    assert "no-such" not in err  # refused before the model is even looked for
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for output, said in [(str(tmp_path / "model"), "is neither a folder nor a file named .joblib"),
                         (str(tmp_path / "notes"), "not a saved model")]:
        for argv in (["demo", "-o", output], ["fit", str(tmp_path / "no-such-data"), "-o", output]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert said in err and "no-such" not in err, err
            if said.startswith("is neither"):
                assert "model/" in err and "model.joblib" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]


def test_fit_writes_the_folder_format_into_an_empty_folder_or_over_a_saved_model(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "d", 2)
    (tmp_path / "m").mkdir()
    for _ in range(2):  # an empty folder, then the saved model it holds
        assert main(["fit", str(data), "--cv", "2", "--max-epochs", "2", "-o", str(tmp_path / "m")]) == 0
        assert _model_files(tmp_path / "m") == ["backbone.pt", "head.pt", "model.json"]
    capsys.readouterr()


def test_fit_to_a_folder_refuses_fine_tuning_before_any_image_is_read(sample, tmp_path, capsys):
    # save_model cannot write a fine-tuned model: said at once, not after the grid search and refit.
    data = copy_images(sample, tmp_path / "d", 2)
    (data / "cardboard" / "broken.jpg").write_bytes(b"not a jpeg")  # reading images would fail on it
    output = str(tmp_path / "out model") + "/"
    for grid in ("unfreeze=1", "unfreeze=0,2"):
        assert main(["fit", str(data), "--cv", "2", "--max-epochs", "1", "--grid", grid, "-o", output]) == 1
        err = capsys.readouterr().err
        assert err.startswith("sktransfer fit: error: -o ") and "fine-tuned" in err, err
        assert "out model.joblib" in err and "broken.jpg" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_out_of_range_settings_are_refused_before_any_image_is_read(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "d", 2)
    (data / "cardboard" / "broken.jpg").write_bytes(b"not a jpeg")  # reading images would fail on it
    for extra, named in [(["--grid", "dropout=0.0,1.5"], "'dropout'"),
                         (["--max-epochs", "0"], "'max_epochs'"),
                         (["--grid", "hidden_units=(),(-3,)"], "hidden_units"),
                         (["--grid", "optimizer__betaz=(0.9, 0.99)"], "did you mean optimizer__betas?")]:
        assert main(["fit", str(data), "--cv", "2", "-o", str(tmp_path / "m.joblib"), *extra]) == 1
        err = capsys.readouterr().err
        assert named in err and "broken.jpg" not in err, err
        assert err.startswith(f"sktransfer fit: error: {extra[0]}"), err
    assert not (tmp_path / "m.joblib").exists()


def test_messages_use_the_command_lines_words(trained, sample, tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    _, _, model_path, data, _ = trained
    small = copy_images(sample, tmp_path / "small", 2)
    assert main(["audit", str(small), "--cv", "2", "--threshold", "2", "-o", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "--threshold 2.0 must be a cosine similarity" in err and "duplicate_threshold" not in err
    other = copy_images(sample, tmp_path / "other", 1)
    shutil.copytree(small / "glass", other / "plastic")
    assert main(["evaluate", str(model_path), str(other), "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"'plastic' (2 images in {str(other / 'plastic')!r})" in err, err
    X, y = load_image_folder(other)
    with open(tmp_path / "other.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *zip(X, y)])
    assert main(["evaluate", str(model_path), str(tmp_path / "other.csv"), "-o", str(tmp_path / "r")]) == 1
    assert "'plastic' (2 images: other.csv line 5, other.csv line 6)" in capsys.readouterr().err
    X, y = load_image_folder(small)
    features = ImageEmbedder().fit_transform(X)
    joblib.dump(LogisticRegression().fit(features, y), tmp_path / "lr.joblib")
    assert main(["predict", str(tmp_path / "lr.joblib"), str(small / "glass")]) == 1
    err = capsys.readouterr().err
    assert "holds a LogisticRegression, which takes features, not image paths" in err and "2D array" not in err, err
    assert "ImageEmbedder" in err
    np.save(tmp_path / "features.npy", features)
    assert main(["predict", str(tmp_path / "features.npy"), str(small / "glass")]) == 1
    err = capsys.readouterr().err
    assert "is neither a save_model folder nor a joblib file" in err and "Error" not in err, err


def test_bad_images_of_a_csv_are_named_by_line(sample, tmp_path, capsys):
    data = copy_images(sample, tmp_path / "photos", 2)
    X, y = load_image_folder(data)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [(os.path.relpath(p, tmp_path), label) for p, label in zip(X, y)]
    rows.insert(3, ("broken.jpg", "glass"))  # the CSV's 5th line, after the header
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    assert main(["fit", str(tmp_path / "labels.csv"), "--cv", "2", "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert f"{str(tmp_path / 'broken.jpg')!r} (labels.csv line 5): not an image file" in err, err


def test_a_grid_over_settings_the_linear_head_ignores_notes_it_once(sample, tmp_path, capsys):
    import warnings

    data = copy_images(sample, tmp_path / "d", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", str(data), "--cv", "2", "--max-epochs", "2", "--grid", "lr=0.001,0.01",
                     "-o", str(tmp_path / "m.joblib")]) == 0
    out = capsys.readouterr().out
    assert out.count("note: lr is not used by the default linear head") == 1, out
    assert not [w for w in caught if "not used by this fit" in str(w.message)]


def test_summaries_count_in_the_singular_too(sample, tmp_path, capsys):
    one = copy_images(sample, tmp_path / "one", 2)
    for c in CLASSES[1:]:
        shutil.rmtree(one / c)
    assert main(["fit", str(one), "--cv", "2", "-o", str(tmp_path / "m.joblib")]) == 1
    assert capsys.readouterr().out.startswith("2 images, 1 class: cardboard (2)\n")
    data = copy_images(sample, tmp_path / "d", 3)
    twin = next((data / "glass").iterdir())
    shutil.copy(twin, twin.with_name("twin.jpg"))
    assert main(["audit", str(data), "--cv", "2", "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "1 duplicate group," in out, out


def test_export_makes_the_missing_folder_of_its_output(trained, tmp_path, capsys):
    pytest.importorskip("onnx")
    _, _, model_path, _, _ = trained
    output = tmp_path / "nodir" / "t.onnx"
    assert main(["export", str(model_path), str(output)]) == 0
    assert output.stat().st_size > 1e6 and sorted(p.name for p in output.parent.iterdir()) == ["t.onnx"]
    capsys.readouterr()


def test_grid_examples_in_fit_help_change_the_model(sample, capsys):
    """Each --grid example of the help gives candidates that predict differently
    (lr, max_epochs or batch_size would not: the default head never reads them)."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    examples = re.search(r"settings to try, e\.g\. (.*?); repeatable", text).group(1).split(" or ")
    assert len(examples) >= 2
    paths, labels = sample
    train, test = [], []
    for c in CLASSES:
        mine = [p for p, lab in zip(paths, labels) if lab == c]
        train += [(p, c) for p in mine[:5]]
        test += mine[5:8]
    X, y = [p for p, _ in train], [c for _, c in train]
    for example in examples:
        grid = _parse_grid([example.replace("'", "")], PretrainedImageClassifier())
        ((key, values),) = grid.items()
        probas = [PretrainedImageClassifier(random_state=0, **{key: v}).fit(X, y).predict_proba(test)
                  for v in values]
        for i in range(len(values)):
            for j in range(i):
                assert np.abs(probas[i] - probas[j]).max() > 1e-3, (example, values[i], values[j])


def test_export_states_the_input_of_a_non_square_recipe(tmp_path, capsys):
    pytest.importorskip("onnx")
    prep = dict(resize_size=(256, 224), crop_size=(224, 192), crop_mode="squash", interpolation="bicubic",
                mean=(0.5,) * 3, std=(0.5,) * 3)
    joblib.dump(ImageEmbedder(preprocessing=prep, engine="torch").fit(), tmp_path / "emb.joblib")
    assert main(["export", str(tmp_path / "emb.joblib"), str(tmp_path / "emb.onnx")]) == 0
    out = capsys.readouterr().out
    assert "uint8 images (n, 224, 192, 3) in, features out" in out
    assert "prepare them as crop_mode='squash' with resize_size=[256, 224] (bicubic) says" in out
