"""The cost of checking a converted body's digests when it is read from the engine cache.

A converted body is read only when its ``.xml`` and ``.bin`` match the sizes
and digests recorded when they were saved; OpenVINO then reads the very
bytes checked, from memory. This times, in one process with the rounds
interleaved, for the default backbone (a ``.bin`` of about 13 MB):

- ``read_model(path)``: OpenVINO reading the files itself, unchecked (as before);
- the check alone: both files read (regular files only) and hashed;
- ``read_model(bytes)``: OpenVINO reading the checked bytes;
- ``convert`` from the cache: record, check and read, as a fit or predict pays it.

    python benchmarks/engine_cache_check.py [--rounds 15] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _common import machine, write_section


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    os.environ["SKTRANSFER_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="sktransfer-engine-")

    from sktransfer import _engine
    from sktransfer._backbones import build_backbone

    backbone = build_backbone("efficientnet_lite0")
    prep = backbone.preprocessing

    def convert():
        return _engine.convert(lambda: backbone.module, backbone.fingerprint, prep, backbone.name)

    convert()  # converted and saved once
    path = _engine._model_path(backbone.fingerprint, prep.crop_shape)
    core = _engine._openvino_core()
    contents = _engine._verified(path, backbone.fingerprint, prep)
    steps = {
        "read_model(path), unchecked": lambda: core.read_model(path),
        "the check: both files read and hashed": lambda: _engine._verified(path, backbone.fingerprint, prep),
        "read_model(bytes checked)": lambda: core.read_model(*contents),
        "convert() from the cache: check and read": convert,
    }
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    size = os.path.getsize(path[:-4] + ".bin") + os.path.getsize(path)
    rows = [f"| {name} | {1000 * statistics.median(t):.1f} |" for name, t in times.items()]
    text = "\n".join([
        f"{machine()}. Default backbone (efficientnet_lite0), converted files {size / 1e6:.1f} MB "
        f"(the `.bin` and the `.xml`), read from the page cache; median of {args.rounds} interleaved rounds "
        "(`python benchmarks/engine_cache_check.py`).",
        "",
        "| step | ms |",
        "|---|---:|",
        *rows,
    ])
    print(text)
    if args.write:
        write_section("engine-cache-check", text)


if __name__ == "__main__":
    main()
