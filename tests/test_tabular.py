"""Images beside tabular columns (ColumnTransformer, pandas output) and images from memory."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from sktransfer import ImageEmbedder, PretrainedImageClassifier, PretrainedImageRegressor


@pytest.fixture(scope="module")
def garden(flowers_small):
    """A DataFrame of photos with a numeric and a categorical column, on a non-default index."""
    paths, species = flowers_small
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "photo": paths,
            "height_cm": rng.normal(40, 10, len(paths)).round(1),
            "bed": rng.choice(["north", "south"], len(paths)),
        },
        index=pd.RangeIndex(100, 100 + len(paths)),
    )
    return frame, species


def columns(photo_column):
    return ColumnTransformer([
        ("image", ImageEmbedder(), photo_column),
        ("num", StandardScaler(), ["height_cm"]),
        ("cat", OneHotEncoder(sparse_output=False), ["bed"]),
    ])


@pytest.mark.parametrize("photo_column", ["photo", ["photo"]])  # a Series or a one-column frame
def test_column_transformer_embeds_the_photo_column(garden, photo_column):
    frame, _ = garden
    ct = columns(photo_column)
    out = ct.fit_transform(frame)
    features = ImageEmbedder().fit_transform(frame["photo"].tolist())
    assert out.shape == (30, features.shape[1] + 3)
    np.testing.assert_array_equal(out[:, :features.shape[1]], features)
    names = ct.get_feature_names_out()
    assert names[0] == "image__imageembedder0" and names[features.shape[1] - 1].startswith("image__")
    assert list(names[-3:]) == ["num__height_cm", "cat__bed_north", "cat__bed_south"]


def test_pandas_output_keeps_names_and_index(garden):
    frame, _ = garden
    out = columns("photo").set_output(transform="pandas").fit_transform(frame)
    assert isinstance(out, pd.DataFrame) and out.index.equals(frame.index)
    assert out.columns[0] == "image__imageembedder0" and "num__height_cm" in out.columns
    embedder = ImageEmbedder().set_output(transform="pandas").fit(frame[["photo"]])
    alone = embedder.transform(frame[["photo"]])
    assert alone.index.equals(frame.index) and list(alone.columns) == list(embedder.get_feature_names_out())
    assert embedder.feature_names_in_.tolist() == ["photo"]
    with pytest.raises(ValueError, match="input_features"):
        embedder.get_feature_names_out(["height_cm"])  # not the column it was fitted on
    with pytest.raises(ValueError, match="feature names should match those that were passed during fit"):
        embedder.transform(frame[["photo"]].rename(columns={"photo": "picture"}))


def test_models_record_the_column_of_images_they_were_fitted_on(garden):
    frame, y = garden
    for model in (PretrainedImageClassifier(max_epochs=2, random_state=0).fit(frame[["photo"]], y),
                  PretrainedImageRegressor(max_epochs=2, random_state=0).fit(frame[["photo"]], frame["height_cm"])):
        assert model.n_features_in_ == 1 and model.feature_names_in_.tolist() == ["photo"]
        model.predict(frame[["photo"]])
        with pytest.raises(ValueError, match="feature names should match those that were passed during fit"):
            model.predict(frame[["photo"]].rename(columns={"photo": "picture"}))
    assert not hasattr(PretrainedImageClassifier(max_epochs=2).fit(list(frame["photo"]), y), "feature_names_in_")


@pytest.mark.parametrize("model, floor", [
    (LogisticRegression(max_iter=2000), 0.6),
    # Trees on 1,283 columns from 20 training rows per fold: weaker, still well above chance.
    (HistGradientBoostingClassifier(max_iter=20, min_samples_leaf=3, random_state=0), 0.45),
])
def test_images_and_tabular_columns_into_one_model(garden, model, floor):
    frame, species = garden
    pipe = make_pipeline(columns("photo"), model)
    scores = cross_val_score(pipe, frame, species, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert scores.mean() > floor  # three species, chance is 1/3


def test_bytes_and_paths_mixed_in_one_X(flowers_small, tmp_path):
    paths, species = flowers_small
    clf = PretrainedImageClassifier(max_epochs=20, random_state=0).fit(paths, species)
    mixed = [Path(paths[0]), Path(paths[1]).read_bytes(), paths[2], Path(paths[3]).read_bytes()]
    np.testing.assert_array_equal(clf.predict_proba(mixed), clf.predict_proba(paths[:4]))
    embedder = ImageEmbedder().fit(mixed)
    np.testing.assert_array_equal(embedder.transform(pd.Series(mixed)), embedder.transform(paths[:4]))
    # Training from memory works too, with the same features as from disk.
    from_memory = [Path(p).read_bytes() if i % 2 else Path(p) for i, p in enumerate(paths)]
    again = PretrainedImageClassifier(max_epochs=20, random_state=0).fit(from_memory, species)
    np.testing.assert_array_equal(again.predict_proba(paths), clf.predict_proba(paths))
