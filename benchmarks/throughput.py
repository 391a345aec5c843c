"""Image paths through the backbone at the speed of the CPU's own inference engine.

For each backbone and photo size, in one run, in interleaved rounds (each
round measures compute-only and steady state one after the other, so drift
of a shared or throttled machine hits both alike; medians and min-max are
reported, and the ratios are the medians of each round's own ratio):
- compute-only img/s of every engine and precision this machine offers
  (PyTorch float32 eager channels_last, OpenVINO float32; OpenVINO and
  PyTorch bfloat16 only where the CPU computes bfloat16 natively;
  torch.compile's figures are in the earlier runs of this page): a batch of 32 preprocessed uint8 images already in memory
  through sktransfer's runner for that path, with sktransfer's heap setting;
- naive img/s: PIL.Image.open -> torchvision transforms -> eager forward,
  batch 32, decoding in the main thread, in a fresh process, timed from
  after its imports (building the model included);
- sktransfer steady state: ImageEmbedder.transform(paths) with the model
  built (and, for OpenVINO, converted and compiled) and the feature cache
  emptied, for engine="auto" (what it chose is shown) and engine="torch",
  and, where the CPU computes bfloat16 natively, precision="bfloat16";
- cold jobs (for the backbones of --cold-backbones, EfficientNet-Lite0 by
  default, to keep a run of the defaults near ten minutes on a quiet 2-core
  machine): fresh processes with empty feature caches embedding 1,600
  photos (flowers5, resized to 500x375), each timed whole from the start of
  its script, imports included, beside the naive loop timed the same way
  (its imports of torch, torchvision, Pillow and, for timm architectures,
  timm count; the import of sktransfer it borrows only to load the same
  weights does not): engine="auto" with no converted body on disk (the job
  converts it) and with one (a later job);
- decoding: the seconds of one core to decode, resize and crop a photo, and
  the ceiling it puts on steady state against compute-only (decoding and
  the engine share the same cores);
- warm latency of predicting one image with a fitted default model;
- peak memory growth while embedding all photos of ../shared/datasets/flowers5,
  over the process with the model loaded and no image seen yet.

Photos: ../shared/datasets/trash6 as they are (512x384 camera photos) and
1600x1200 versions of them made into a temporary folder. resnet18/resnet50
run only where their ImageNet weights are on disk (they need a download).

    python benchmarks/throughput.py [--n 192] [--rounds 3] [--cold-n 1600] [--write [--section SUFFIX]]
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import DATASETS, Timer, add_section_option, machine, run_script, stratified_subset, write_figures


def cpu_line():
    """Whether the CPU computes bfloat16 natively (``machine()`` names the CPU and its flags)."""
    from sktransfer._engine import cpu_has_bf16

    return f"native bfloat16: {cpu_has_bf16()}"


def make_photos(folder, n, size, seed=0, source="flowers5"):
    """``n`` photos of ``source``; resized to ``size`` (a new file each) unless ``size`` is None."""
    from PIL import Image

    paths, labels = stratified_subset(DATASETS / source, n, seed=seed)
    if size is None:
        return [str(p) for p in paths], labels
    out = []
    for i, (p, label) in enumerate(zip(paths, labels)):
        target = Path(folder) / source / f"{size[0]}x{size[1]}" / label / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(str(target))
    return out, labels


def weights_for(name):
    """The pretrained weights where they are on disk; None (skip) where they need a download."""
    from sktransfer._backbones import describe_backbone

    return "DEFAULT" if describe_backbone(name)["weights_offline"] else None


def plans_offered():
    """Every engine and precision this machine runs natively, as (engine, precision)."""
    from sktransfer import _engine

    plans = [("torch", "float32")]
    if _engine.cpu_has_bf16():
        plans.append(("torch", "bfloat16"))
    if _engine._openvino_core() is not None:
        plans.append(("openvino", "float32"))
        if _engine.cpu_has_bf16():
            plans.append(("openvino", "bfloat16"))
    return plans


def compute_only(backbone, batch=32, seconds=2.5):
    """img/s of each offered path on a batch of uint8 images already in memory."""
    from sktransfer._runtime import steady_heap

    h, w = backbone.preprocessing.crop_shape
    arrays = list(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8))
    rates = {}
    for engine, precision in plans_offered():
        plan = backbone.plan(engine=engine, precision=precision)
        run = backbone.runner(plan, "cpu")
        with steady_heap():
            run(arrays)  # warm-up
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                run(arrays)
                done += batch
        rates[f"{engine} {precision}"] = done / (time.perf_counter() - start)
    return rates


def steady_state(embedder, paths):
    """img/s of ``embedder.transform(paths)`` with the model ready and the feature cache emptied."""
    from sktransfer import clear_cache

    clear_cache()
    with Timer() as t:
        embedder.transform(paths)
    return len(paths) / t.seconds


def decoding_seconds(paths, preprocessing):
    """Seconds of one core per photo to decode, resize and crop ``paths`` (sktransfer's one
    decoding path, in this thread)."""
    from sktransfer._images import load_pixels

    with Timer() as t:
        for path in paths:
            load_pixels(path, preprocessing)
    return t.seconds / len(paths)


def ceiling(rate, decoding, cores):
    """The most of the compute-only ``rate`` (img/s on ``cores`` cores) that embedding from
    photos can reach when decoding costs ``decoding`` seconds of a core per photo on the same
    cores: each photo then takes ``cores / rate + decoding`` core-seconds."""
    return 1 / (1 + decoding * rate / cores)


def spread(values):
    """'median (min-max)' of a list of rates or ratios."""
    fmt = "{:.2f}" if max(values) < 10 else "{:.1f}"
    middle = fmt.format(float(np.median(values)))
    return middle if len(values) == 1 else f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


NAIVE = r'''
import time
start = time.perf_counter()  # a whole job, as OURS is timed: its imports count
import sys, json, torch, torchvision
from PIL import Image
from torchvision import transforms as T
name, weights, paths = sys.argv[1], (None if sys.argv[2] == "None" else sys.argv[2]), json.load(open(sys.argv[3]))
if name.startswith(("efficientnet_lite", "timm/")):
    import timm  # where these architectures come from
before = time.perf_counter()
from sktransfer._backbones import build_backbone  # only to load the same weights: its own imports are not counted
borrowed = time.perf_counter() - before
imported = time.perf_counter()
b = build_backbone(name, weights)
p = b.preprocessing
module = b.module.to(memory_format=torch.contiguous_format)
t = T.Compose([T.Resize(p.resize_size, interpolation=T.InterpolationMode(p.interpolation)), T.CenterCrop(p.crop_size),
               T.ToTensor(), T.Normalize(p.mean, p.std)])
out = []
with torch.inference_mode():
    for i in range(0, len(paths), 32):
        x = torch.stack([t(Image.open(q).convert("RGB")) for q in paths[i:i + 32]])
        out.append(module(x))
end = time.perf_counter()
print(json.dumps({"job": end - start - borrowed, "after_imports": end - imported, "n": len(paths)}))
'''

OURS = r'''
import sys, time, json
start = time.perf_counter()
from sktransfer import ImageEmbedder
name, weights, paths = sys.argv[1], (None if sys.argv[2] == "None" else sys.argv[2]), json.load(open(sys.argv[3]))
ImageEmbedder(name, weights=weights, engine=sys.argv[4]).fit_transform(paths)
print(json.dumps({"seconds": time.perf_counter() - start, "n": len(paths)}))
'''

MEMORY = r'''
import json, sys, threading, time
from sktransfer import ImageEmbedder, load_image_folder
paths, _ = load_image_folder(sys.argv[1])
emb = ImageEmbedder().fit()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base, peak, running = rss(), 0, True  # the loaded model, before any image
def watch():  # the peak while embedding, sampled every 5 ms
    global peak
    while running:
        peak = max(peak, rss())
        time.sleep(0.005)
watcher = threading.Thread(target=watch)
watcher.start()
features = emb.transform(paths)
running = False
watcher.join()
print(json.dumps({"base": base, "peak": peak, "n": len(paths), "features_bytes": features.nbytes}))
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=192, help="photos for the steady-state rows")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of compute-only and steady state")
    parser.add_argument("--cold-n", type=int, default=1600, help="photos for the cold-job rows (0: none)")
    parser.add_argument("--cold-backbones", default="efficientnet_lite0", help="backbones with cold-job rows")
    parser.add_argument("--no-memory", action="store_true", help="leave out the peak-memory row")
    parser.add_argument("--backbones",
                        default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,resnet18,resnet50")
    parser.add_argument("--write", action="store_true")
    add_section_option(parser)
    args = parser.parse_args()

    from sktransfer import ImageEmbedder, PretrainedImageClassifier, clear_cache
    from sktransfer._backbones import build_backbone
    from sktransfer._engine import cpu_has_bf16

    work = Path(tempfile.mkdtemp(prefix="sktransfer-bench-"))
    atexit.register(shutil.rmtree, work, True)  # its photos and conversions: tens of MB
    os.environ["SKTRANSFER_ENGINE_CACHE"] = str(work / "converted")  # this run converts afresh
    lines = [
        f"{machine()}; {cpu_line()}. Steady state on {args.n} photos of trash6 (and 1600x1200 versions "
        f"of them), in {args.rounds} interleaved rounds of compute-only and steady state: median "
        "(min-max) over the rounds; ratios are the medians of each round's own ratio. Cold jobs on "
        f"{args.cold_n} photos of flowers5 resized to 500x375 (fresh processes timed from the start of "
        "their scripts, imports and set-up included, the naive loop's too; empty feature caches). img/s = images per second; compute-only = a batch of 32 preprocessed images "
        "in memory through each engine and precision. Decoding = decoding, resizing and cropping one photo "
        "(sktransfer's own path, one core); its ceiling = 1 / (1 + decoding × best compute-only rate / cores): "
        "the most of the best compute-only rate that photos can reach when decoding shares the cores.",
        "",
        "| backbone | photos | compute-only img/s by path | naive loop | steady, auto (its choice) "
        "| steady, torch float32 | steady auto / best compute | auto / torch float32 "
        "| steady, precision=\"bfloat16\" (/ best compute) | decoding ms of one core "
        "| ceiling of steady / best compute |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    skipped, colds = [], []
    for name in args.backbones.split(","):
        weights = weights_for(name)
        if weights is None:
            skipped.append(name)
            continue
        backbone = build_backbone(name, weights)
        compute_only(backbone, seconds=0.5)  # converts and compiles every path before the rounds
        embedders = {engine: ImageEmbedder(name, weights=weights, engine=engine).fit()
                     for engine in ("auto", "torch")}
        if cpu_has_bf16():  # what a user who asks for bfloat16 gets from photos
            embedders["bfloat16"] = ImageEmbedder(name, weights=weights, precision="bfloat16").fit()
        for size in ("trash6", "1600x1200"):
            paths, labels = make_photos(work, args.n, None if size == "trash6" else (1600, 1200),
                                        source="trash6")
            listing = work / f"paths-{size}.json"
            listing.write_text(json.dumps(paths))
            naive = run_script(NAIVE, name, weights, listing)  # also brings the photos into the page cache
            for embedder in embedders.values():
                clear_cache()
                embedder.transform(paths[:32])  # warm-up; auto finds the body converted above
            rates, steady = collections.defaultdict(list), collections.defaultdict(list)
            decoding = []
            for r in range(args.rounds):
                for label, rate in compute_only(backbone).items():
                    rates[label].append(rate)
                for engine, embedder in embedders.items():
                    steady[engine].append(steady_state(embedder, paths))
                decoding.append(decoding_seconds(paths, backbone.preprocessing))
                print(f"{name} {size} round {r + 1}: compute-only "
                      f"{', '.join(f'{k} {v[-1]:.1f}' for k, v in rates.items())}; steady "
                      f"{', '.join(f'{k} {v[-1]:.1f}' for k, v in steady.items())}", flush=True)
            best = [max(round_rates) for round_rates in zip(*rates.values())]
            chose = embedders["auto"].backbone_.plan(engine="auto", precision="auto")
            asked = "n/a" if "bfloat16" not in steady else (
                f"{spread(steady['bfloat16'])} ({spread([a / b for a, b in zip(steady['bfloat16'], best)])})")
            lines.append(
                f"| {name} | {size} | {', '.join(f'{k} {spread(v)}' for k, v in rates.items())} "
                f"| {naive['n'] / naive['after_imports']:.1f} | {spread(steady['auto'])} ({chose.engine} {chose.precision}) "
                f"| {spread(steady['torch'])} | {spread([a / b for a, b in zip(steady['auto'], best)])} "
                f"| {spread([a / b for a, b in zip(steady['auto'], steady['torch'])])} | {asked} "
                f"| {spread([1000 * d for d in decoding])} "
                f"| {spread([ceiling(b, d, cores) for b, d in zip(best, decoding)])} |"
            )
            print(lines[-1], flush=True)
        if not args.cold_n or name not in args.cold_backbones.split(","):
            continue
        cold_paths, _ = make_photos(work, args.cold_n, (500, 375), seed=1)
        cold_listing = work / "cold.json"
        cold_listing.write_text(json.dumps(cold_paths))
        os.environ["SKTRANSFER_ENGINE_CACHE"] = str(work / f"cold-{name}")  # nothing converted yet
        naive_cold = run_script(NAIVE, name, weights, cold_listing)["job"]
        first = run_script(OURS, name, weights, cold_listing, "auto")["seconds"]
        later = run_script(OURS, name, weights, cold_listing, "auto")["seconds"]
        torch_cold = run_script(OURS, name, weights, cold_listing, "torch")["seconds"]
        colds.append(f"| {name} | {naive_cold:.1f} | {torch_cold:.1f} | {first:.1f} | {later:.1f} "
                     f"| {naive_cold / first:.2f} | {naive_cold / later:.2f} |")
        print(colds[-1], flush=True)
        os.environ["SKTRANSFER_ENGINE_CACHE"] = str(work / "converted")

    lines += [] if not colds else [
        "",
        "| backbone | naive cold job s | sktransfer torch s | sktransfer auto, converting s "
        "| sktransfer auto, converted before s | speed-up, converting | speed-up, converted before |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *colds,
    ]
    if skipped:
        lines += ["", f"Not measured, their ImageNet weights are not on this machine (a download): "
                      f"{', '.join(skipped)}."]

    paths, labels = make_photos(work, min(args.n, 160), None, source="trash6")
    latency, floor = {}, None
    for engine in ("auto", "torch"):
        clf = PretrainedImageClassifier(random_state=0, engine=engine).fit(paths, labels)
        one = paths[len(paths) // 3]
        clf.predict([one])
        times = []
        for _ in range(20):
            clear_cache()
            with Timer() as t:
                clf.predict([one])
            times.append(t.seconds * 1000)
        backbone = clf.embedder_.backbone_
        plan = backbone.plan(engine=engine, precision="auto")
        latency[f"{engine} ({plan.engine} {plan.precision})"] = np.median(times)
        if engine == "auto":  # the floor: one preprocessed image through the engine alone
            run = backbone.runner(plan, "cpu")
            h, w = backbone.preprocessing.crop_shape
            image = [np.zeros((h, w, 3), dtype=np.uint8)]
            run(image)
            floor = []
            for _ in range(20):
                with Timer() as t:
                    run(image)
                floor.append(t.seconds * 1000)
            floor = f"{plan.engine} {plan.precision}: {np.median(floor):.1f} ms"
    lines += [
        "",
        "Predicting one trash6 photo with a fitted default model, warm, feature cache emptied each time, "
        "median of 20 calls: " + ", ".join(f"engine={k}: {v:.1f} ms" for k, v in latency.items())
        + f"; the engine alone on one preprocessed image ({floor}).",
    ]
    if not args.no_memory:
        mem = run_script(MEMORY, DATASETS / "flowers5")
        lines += [
            "",
            f"Embedding all {mem['n']} photos of `../shared/datasets/flowers5`: peak memory "
            f"{(mem['peak'] - mem['base']) / 2**20:.0f} MB above the loaded model "
            f"(the feature matrix itself is {mem['features_bytes'] / 2**20:.0f} MB).",
        ]
    print("\n".join(lines))
    if args.write:
        write_figures("throughput", "## Throughput by engine", "\n".join(lines), args.section)


if __name__ == "__main__":
    main()
