"""The disk feature cache's cost per entry: looking up, checking and writing 1,000 entries.

Each level below ``cache_dir`` is reached without following a link (by
descriptor on POSIX, by path with a check of each level where the platform
has no ``O_NOFOLLOW`` and ``dir_fd``); the baseline is a look-up as it was
before those checks (one open of the entry by its whole path, the same
checksum and copy). For scale, the digest of a bundled photo, which every
look-up of a path computes first (reading the file), is timed too. Rounds
interleave the ways, and the table gives the median over rounds of each
way's microseconds per entry, and its ratio to the baseline in the same
round. The table is written into docs/benchmarks.md between
``<!-- cache_lookup:start -->`` and ``<!-- cache_lookup:end -->``.

Run from the project root: ``python benchmarks/cache_lookup.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from sktransfer import _outputs, load_image_folder
from sktransfer._cache import DIGEST_SIZE, DiskCache, _read_regular, digest, read_file

from _common import ROOT, machine, write_section

ENTRIES = 1000
FEATURES = 1280  # efficientnet_lite0's
ROUNDS = 7


def per_entry(call, keys):
    """Microseconds per key of ``call(key)`` over ``keys``."""
    start = time.perf_counter()
    for key in keys:
        call(key)
    return (time.perf_counter() - start) / len(keys) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    size = 4 * FEATURES + DIGEST_SIZE
    keys = [digest(str(k).encode()) for k in range(ENTRIES)]
    vector = np.arange(FEATURES, dtype=np.float32)
    ways = {"by descriptor": True, "by path, each level checked": False}
    if not _outputs._BY_DESCRIPTOR:
        del ways["by descriptor"]
    baseline = "get as before: one open by the whole path"
    photos = load_image_folder(ROOT / "sktransfer" / "data" / "trash_sample")[0][:ENTRIES]
    times = {name: [] for name in [baseline, *[f"get, {w}" for w in ways], *[f"has, {w}" for w in ways],
                                   *[f"put, {w}" for w in ways], "digest of a bundled photo (read_file)"]}
    ratios = {name: [] for name in times}
    with tempfile.TemporaryDirectory() as tmp:
        cache = DiskCache(tmp, "f" * 32)
        for key in keys:
            cache.put(key, vector)

        def get_as_before(key):
            _, data = _read_regular(cache._path(key), size=size, follow_links=False)
            body = data[:-DIGEST_SIZE]
            assert cache._check(key, body) == data[-DIGEST_SIZE:]
            return np.frombuffer(body, dtype=np.float32).copy()

        for _ in range(ROUNDS):
            got = {baseline: per_entry(get_as_before, keys),
                   "digest of a bundled photo (read_file)": per_entry(read_file, photos)}
            for way, by_descriptor in ways.items():
                _outputs._BY_DESCRIPTOR = by_descriptor
                got[f"get, {way}"] = per_entry(lambda key: cache.get(key, FEATURES), keys)
                got[f"has, {way}"] = per_entry(cache.has, keys)
                got[f"put, {way}"] = per_entry(lambda key: cache.put(key, vector), keys)
            for name, value in got.items():
                times[name].append(value)
                ratios[name].append(value / got[baseline])
    rows = ["| operation | µs per entry | × baseline |", "|---|---:|---:|"]
    rows += [f"| {name} | {statistics.median(times[name]):.1f} | {statistics.median(ratios[name]):.2f} |"
             for name in times]
    text = (f"{ENTRIES:,} entries of {FEATURES} features in a temporary folder (page cache warm), "
            f"median of {ROUNDS} interleaved rounds; {machine()}.\n\n" + "\n".join(rows))
    print(text)
    if not args.no_write:
        write_section("cache_lookup", text)


if __name__ == "__main__":
    main()
