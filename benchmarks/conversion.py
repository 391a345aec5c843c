"""Converting a body for OpenVINO: through ONNX against OpenVINO's PyTorch front end.

sktransfer traces the body to ONNX (PyTorch's TorchScript-based exporter)
and reads that with OpenVINO's ONNX reader; without the ``onnx`` package it
converts with ``openvino.convert_model`` on a module it traced once. The
third row is ``openvino.convert_model`` on the module itself, as sktransfer
converted before (it traces the module, then traces again to check it).

Each conversion is timed in a fresh process (the backbone built and
``openvino`` imported before the clock starts), the routes interleaved over
``--rounds``; the features of 8 trash6 photos are compared with float32
PyTorch. Then the three converted graphs, compiled alike (float32, batch 32,
uint8 input normalised in the graph), run in interleaved rounds in one
process.

    python benchmarks/conversion.py [--backbones efficientnet_lite0,...] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import DATASETS, machine, run_script, stratified_subset, write_section

ROUTES = {
    "onnx": "through ONNX (sktransfer)",
    "traced": "openvino.convert_model on a module traced once (sktransfer without onnx)",
    "module": "openvino.convert_model on the module (traced and checked by OpenVINO)",
}

CONVERT = r'''
import json, sys, time, warnings
import numpy as np, torch
warnings.simplefilter("ignore")
import openvino
from sktransfer import _backbones, _engine
from sktransfer._cache import read_file
from sktransfer._images import load_pixels
name, route, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
backbone = _backbones.build_backbone(name)
module, prep = backbone.module, backbone.preprocessing
h, w = prep.crop_shape
example = torch.zeros(1, 3, h, w).contiguous(memory_format=torch.channels_last)
core = openvino.Core()
start = time.perf_counter()
if route == "onnx":
    model = core.read_model(_engine.onnx_graph(module, example, input_names=["images"],
                                               dynamic_axes={"images": {0: "n"}}))
elif route == "traced":
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    model = openvino.convert_model(traced, example_input=example, input=[(-1, 3, h, w)])
else:
    model = openvino.convert_model(module, example_input=example, input=[(-1, 3, h, w)])
seconds = time.perf_counter() - start
pixels = [load_pixels(read_file(p)[1], prep) for p in paths]
ours = _engine.OpenVINORunner(_engine.compile_openvino(model, prep, "float32", torch.get_num_threads()))(pixels)
reference = _engine.TorchRunner(module, prep, "cpu", "float32")(pixels)
print(json.dumps({"seconds": seconds, "max_diff": float(np.abs(ours - reference).max())}))
'''


def converted(name, route):
    """The body of ``name`` converted by ``route``, in this process (untimed)."""
    import openvino
    import torch

    from sktransfer import _backbones, _engine

    backbone = _backbones.build_backbone(name)
    h, w = backbone.preprocessing.crop_shape
    example = torch.zeros(1, 3, h, w).contiguous(memory_format=torch.channels_last)
    if route == "onnx":
        return openvino.Core().read_model(_engine.onnx_graph(backbone.module, example, input_names=["images"],
                                                             dynamic_axes={"images": {0: "n"}}))
    module = backbone.module
    if route == "traced":
        with torch.no_grad():
            module = torch.jit.trace(module, example, check_trace=False)
    return openvino.convert_model(module, example_input=example, input=[(-1, 3, h, w)])


def throughput(name, rounds):
    """img/s of each route's graph, batch 32, in interleaved rounds."""
    import torch

    from sktransfer import _backbones, _engine

    prep = _backbones.build_backbone(name).preprocessing
    runners = {route: _engine.OpenVINORunner(_engine.compile_openvino(converted(name, route), prep, "float32",
                                                                      torch.get_num_threads()))
               for route in ROUTES}
    h, w = prep.crop_shape
    batch = list(np.random.default_rng(0).integers(0, 256, (32, h, w, 3), dtype=np.uint8))
    rates = {route: [] for route in ROUTES}
    for _ in range(rounds):
        for route, run in runners.items():
            run(batch)  # warm
            start = time.perf_counter()
            for _ in range(4):
                run(batch)
            rates[route].append(4 * len(batch) / (time.perf_counter() - start))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import json

    paths, _ = stratified_subset(DATASETS / "trash6", 8)
    rows = []
    for name in args.backbones.split(","):
        seconds, diffs = {route: [] for route in ROUTES}, {route: [] for route in ROUTES}
        for _ in range(args.rounds):
            for route in ROUTES:
                out = run_script(CONVERT, name, route, json.dumps([str(p) for p in paths]))
                seconds[route].append(out["seconds"])
                diffs[route].append(out["max_diff"])
        rates = throughput(name, args.rounds)
        for route, label in ROUTES.items():
            rows.append(f"| {name} | {label} | {statistics.median(seconds[route]):.2f} "
                        f"({min(seconds[route]):.2f}-{max(seconds[route]):.2f}) | {max(diffs[route]):.1e} "
                        f"| {statistics.median(rates[route]):.1f} ({min(rates[route]):.1f}-{max(rates[route]):.1f}) |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "## Converting the body for OpenVINO",
        "",
        f"{machine()}. Conversion seconds in fresh processes (the backbone built and `openvino` imported "
        f"before the clock starts), median (min-max) of {args.rounds} interleaved rounds; the largest "
        "feature difference from float32 PyTorch on 8 trash6 photos; img/s of the compiled graph (float32, "
        f"batch 32), median (min-max) of {args.rounds} interleaved rounds in one process.",
        "",
        "| backbone | route | conversion s | max. difference from PyTorch | img/s |",
        "|---|---|---:|---:|---:|",
        *rows,
    ])
    print(text)
    if args.write:
        write_section("conversion", text)


if __name__ == "__main__":
    main()
