"""Grid search and embedding in parallel: loky processes and a real Dask cluster."""

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

from sktransfer import ImageEmbedder, PretrainedImageClassifier, cache_info, clear_cache, embed_dask

GRID = {"hidden_units": [(), (16,)], "weight_decay": [1e-4, 1e-2]}
CV = StratifiedKFold(3, shuffle=True, random_state=0)


def _search(cache_dir, n_jobs=1):
    clf = PretrainedImageClassifier(max_epochs=15, random_state=0, cache_dir=cache_dir)
    return GridSearchCV(clf, GRID, cv=CV, n_jobs=n_jobs)


@pytest.mark.slow
def test_n_jobs_workers_share_features_through_cache_dir(tmp_path, flowers_small):
    X, y = flowers_small
    cache = tmp_path / "cache"
    clear_cache()
    parallel = _search(cache, n_jobs=-1).fit(X, y)
    # The workers wrote every image's features once into the shared cache ...
    assert cache_info(cache)["entries"] == len(X)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.f32")}
    # ... and a serial search in this process reuses them: same scores, no new writes.
    clear_cache()
    serial = _search(cache, n_jobs=1).fit(X, y)
    np.testing.assert_array_equal(parallel.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"])
    assert parallel.best_params_ == serial.best_params_
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.f32")} == files
    # Features computed with one torch thread per worker equal this process's up to float rounding.
    clear_cache()
    np.testing.assert_allclose(
        ImageEmbedder().fit_transform(X), ImageEmbedder(cache_dir=cache).fit_transform(X), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_cross_val_score_in_processes_matches_serial(tmp_path, flowers_small):
    X, y = flowers_small
    clf = PretrainedImageClassifier(max_epochs=15, random_state=0, cache_dir=tmp_path)
    parallel = cross_val_score(clf, X, y, cv=CV, n_jobs=2)
    clear_cache()
    serial = cross_val_score(clf, X, y, cv=CV, n_jobs=1)
    np.testing.assert_array_equal(parallel, serial)


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.mark.slow
def test_grid_search_on_dask_cluster_matches_local(tmp_path, flowers_small, dask_client):
    X, y = flowers_small
    cache = tmp_path / "cache"
    clear_cache()
    with joblib.parallel_backend("dask"):
        remote = _search(cache).fit(X, y)
    assert len(dask_client.scheduler_info()["workers"]) == 2
    assert cache_info(cache)["entries"] == len(X)  # computed by the workers
    clear_cache()
    local = _search(cache).fit(X, y)
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


def test_embed_dask_keeps_the_order_of_the_paths(sample):
    """A Series whose index is not sorted: one row per path, in the order given (not the index's)."""
    paths = pd.Series(sample[0][:6:2] + sample[0][60:66:2], index=[5, 2, 0, 4, 1, 3])
    embedder = ImageEmbedder(engine="torch")
    lazy = embed_dask(paths, embedder, npartitions=2)
    features = lazy.compute(scheduler="synchronous")
    assert list(features.index) == list(paths.index)
    np.testing.assert_allclose(features.to_numpy(), embedder.fit().transform(list(paths)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_embed_dask_names_a_bad_image_by_its_label_in_paths(sample, tmp_path):
    import pandas as pd

    from sktransfer import ImageInputError

    paths = list(sample[0][:6])
    paths[4] = str(tmp_path / "missing.jpg")
    features = embed_dask(pd.Series(paths, index=range(100, 106)), npartitions=3)
    with pytest.raises(ImageInputError, match=r"of paths cannot be used as images:\n  \[104\] '.*missing\.jpg': file not found") as caught:
        features.compute(scheduler="synchronous")
    assert [i for i, *_ in caught.value.errors] == [104]


def test_embed_dask_names_what_it_needs_instead_of_a_classifier(sample):
    with pytest.raises(TypeError, match="embedder must be an ImageEmbedder.*PretrainedImageClassifier"):
        embed_dask(sample[0][:2], PretrainedImageClassifier())


def test_embed_dask_partition_by_partition_to_parquet(tmp_path, sample, dask_client):
    paths = pd.Series(sample[0][::5], index=np.arange(100, 100 + len(sample[0][::5])))
    lazy = embed_dask(paths, ImageEmbedder(batch_size=8, cache_dir=tmp_path / "cache"), npartitions=3)
    assert lazy.npartitions == 3
    lazy.to_parquet(tmp_path / "features")
    features = pd.read_parquet(tmp_path / "features")
    assert list(features.index) == list(paths.index)
    assert features.shape == (len(paths), 1280) and features.columns[0] == "imageembedder0"
    clear_cache()
    np.testing.assert_allclose(features.to_numpy(), ImageEmbedder().fit_transform(paths), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 columns"):
        import dask.dataframe as dd

        embed_dask(dd.from_pandas(pd.DataFrame({"a": paths, "b": paths}), npartitions=1))
