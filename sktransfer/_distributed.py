"""Embedding many images on a Dask cluster, partition by partition.

Grid searches need nothing from here: ``with joblib.parallel_backend("dask"):``
runs scikit-learn's own parallel loops on the cluster, and ``cache_dir`` on a
folder every worker can reach lets them share features.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

from ._estimator import ImageEmbedder
from ._inputs import ImageInputError

__all__ = ["embed_dask"]


def _embed_partition(partition, embedder, columns):
    import pandas as pd

    if len(partition) == 0:
        return pd.DataFrame(np.empty((0, len(columns)), np.float32), columns=columns, index=partition.index)
    # Each worker process builds the backbone once (it is cached per process).
    try:
        features = clone(embedder).fit().transform(partition)
    except ImageInputError as e:  # named by their label in paths, not their place in the partition
        raise ImageInputError([(partition.index[i], item, reason) for i, item, reason in e.errors],
                              name="paths") from None
    return pd.DataFrame(features, columns=columns, index=partition.index)


def embed_dask(paths, embedder=None, *, npartitions=None):
    """Embed a large collection of images on a Dask cluster, lazily.

    Parameters
    ----------
    paths : dask Series, pandas Series or sequence of str
        Image paths (or other image items). A pandas Series or a sequence
        is split into ``npartitions`` partitions first.
    embedder : ImageEmbedder, default=None
        Its parameters choose the backbone, batch size, device and
        ``cache_dir``; it is cloned and fitted in each worker. Point
        ``cache_dir`` at a folder all workers share so a rerun skips work.
        Defaults to ``ImageEmbedder()``.
    npartitions : int, default=None
        Partitions for a non-dask ``paths`` (default: one per 1,000 paths).

    Returns
    -------
    features : dask DataFrame
        One row per path, in order and with the index of ``paths``, columns
        named like ``ImageEmbedder.get_feature_names_out()``. Compute it, or
        write it with ``.to_parquet(folder)`` partition by partition without
        holding all features in memory.

    Examples
    --------
    Here with Dask's local scheduler; on a cluster, create its ``Client``
    first and compute or write the result the same way.

    >>> from sktransfer import ImageEmbedder, embed_dask, load_image_folder
    >>> paths, _ = load_image_folder("sktransfer/data/trash_sample")
    >>> features = embed_dask(paths[:4], ImageEmbedder(), npartitions=2)
    >>> features.compute(scheduler="synchronous").shape
    (4, 1280)
    """
    import dask.dataframe as dd
    import pandas as pd

    embedder = ImageEmbedder() if embedder is None else embedder
    if not isinstance(embedder, ImageEmbedder):
        raise TypeError(f"embedder must be an ImageEmbedder (its features are what embed_dask computes), "
                        f"got {type(embedder).__name__}; a classifier's is its embedder_ once fitted.")
    if not isinstance(paths, (dd.Series, dd.DataFrame)):
        series = paths if isinstance(paths, pd.Series) else pd.Series(list(paths), dtype=object)
        parts = npartitions or max(1, -(-len(series) // 1000))
        paths = dd.from_pandas(series, npartitions=parts, sort=False)  # the order given, not the index's
    if isinstance(paths, dd.DataFrame):
        if len(paths.columns) != 1:
            raise ValueError(
                f"paths is a dask DataFrame with {len(paths.columns)} columns; pass the one column of paths."
            )
        paths = paths[paths.columns[0]]
    # The feature size is known from the backbone alone; building it here also
    # checks the parameters before any task is sent.
    columns = list(clone(embedder).fit().get_feature_names_out())
    meta = pd.DataFrame({c: pd.Series(dtype=np.float32) for c in columns})
    return paths.map_partitions(_embed_partition, embedder, columns, meta=meta)
