"""Image paths through the backbone at the speed of the backbone itself.

For each backbone and photo size, in one run:
- compute-only img/s: random tensors already in memory, batch 32, eager
  channels_last and torch.compile (the better one is the reference), each
  in glibc's default heap (as a plain script runs) and again with the heap
  setting sktransfer uses during its passes (``steady_heap``), so the
  ratio is shown against both;
- naive img/s: PIL.Image.open -> torchvision transforms -> eager forward,
  batch 32, decoding in the main thread;
- sktransfer steady state: ImageEmbedder.fit_transform(paths) and the
  classifier's fit with the model built (and compiled, when compile=True)
  and the feature cache emptied;
- cold job: a fresh process with empty feature caches embedding every photo,
  set-up included, beside the naive loop run the same way;
- warm latency of predicting one image with a fitted default model;
- peak memory growth while embedding all photos of ../shared/datasets/flowers5,
  over the process with the model loaded and no image seen yet.

Photos of 500x375 and 1600x1200 are made from ../shared/datasets/flowers5 by
resizing (so they are real photos, though smoother than camera originals).
resnet18 runs with random weights (its ImageNet weights need a download): the
arithmetic, and so the speed, is the same.

    python benchmarks/throughput.py [--n 320] [--cold-n 1600] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import DATASETS, Timer, machine, run_script, stratified_subset, write_section


def make_photos(folder, n, size, seed=0):
    from PIL import Image

    paths, labels = stratified_subset(DATASETS / "flowers5", n, seed=seed)
    out = []
    for i, (p, label) in enumerate(zip(paths, labels)):
        target = Path(folder) / f"{size[0]}x{size[1]}" / label / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(str(target))
    return out, labels


def weights_for(name):
    return "DEFAULT" if name == "efficientnet_lite0" else None


def compute_only(backbone, batch=32, seconds=8.0):
    """img/s of the bare forward pass on random tensors, eager channels_last and
    compiled, each in glibc's default heap and with sktransfer's heap setting."""
    from sktransfer._runtime import steady_heap

    module = backbone.module
    x = torch.randn(batch, 3, backbone.preprocessing.crop_size, backbone.preprocessing.crop_size)
    x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(module, dynamic=False)
    rates = {}
    for heap, context in (("", contextlib.nullcontext), (" tuned heap", steady_heap)):
        for name, fn in (("eager channels_last", module), ("torch.compile", compiled)):
            with torch.inference_mode(), context():
                fn(x)
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    fn(x)
                    done += batch
            rates[name + heap] = done / (time.perf_counter() - start)
    return rates


NAIVE = r'''
import sys, time, json, torch
from PIL import Image
from torchvision import transforms as T
from sktransfer._backbones import build_backbone
start = time.perf_counter()
name, weights, paths = sys.argv[1], (None if sys.argv[2] == "None" else sys.argv[2]), json.load(open(sys.argv[3]))
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
print(json.dumps({"seconds": time.perf_counter() - start, "n": len(paths)}))
'''

OURS = r'''
import sys, time, json
start = time.perf_counter()
from sktransfer import ImageEmbedder
name, weights, paths = sys.argv[1], (None if sys.argv[2] == "None" else sys.argv[2]), json.load(open(sys.argv[3]))
ImageEmbedder(name, weights=weights, compile=sys.argv[4] if sys.argv[4] == "auto" else sys.argv[4] == "True").fit_transform(paths)
print(json.dumps({"seconds": time.perf_counter() - start, "n": len(paths)}))
'''

MEMORY = r'''
import json, sys, threading, time
from sktransfer import ImageEmbedder, load_image_folder
paths, _ = load_image_folder(sys.argv[1])
emb = ImageEmbedder(compile=False).fit()
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
    parser.add_argument("--n", type=int, default=320, help="photos for the steady-state rows")
    parser.add_argument("--cold-n", type=int, default=1600, help="photos for the cold-job rows")
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet18")
    parser.add_argument("--sizes", default="500x375,1600x1200")
    parser.add_argument("--cold-all", action="store_true", help="cold jobs for every photo size, not just the first")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from sktransfer import ImageEmbedder, PretrainedImageClassifier, clear_cache
    from sktransfer._backbones import build_backbone

    work = Path(tempfile.mkdtemp(prefix="sktransfer-bench-"))
    lines = [
        f"{machine()}. Steady state on {args.n} photos, cold jobs on {args.cold_n} "
        "(fresh processes, empty feature caches, set-up included). img/s = images per second.",
        "",
        "| backbone | photos | compute-only eager CL | compute-only compiled "
        "| compute-only eager CL, tuned heap | compute-only compiled, tuned heap | naive loop "
        "| sktransfer steady (eager) | sktransfer steady (compiled) | steady / best compute "
        "| steady / best compute, tuned heap | classifier fit img/s | naive cold job s "
        "| sktransfer cold job s (auto) | cold speed-up |",
        "|---|---|" + "---:|" * 13,
    ]
    for name in args.backbones.split(","):
        backbone = build_backbone(name, weights_for(name))
        rates = compute_only(backbone)
        best = max(rates["eager channels_last"], rates["torch.compile"])
        best_tuned = max(rates["eager channels_last tuned heap"], rates["torch.compile tuned heap"])
        for size in args.sizes.split(","):
            w, h = map(int, size.split("x"))
            paths, labels = make_photos(work, args.n, (w, h))
            listing = work / f"paths-{size}.json"
            listing.write_text(json.dumps(paths))
            naive = run_script(NAIVE, name, weights_for(name), listing)
            steady = {}
            for compiled in (False, True):
                emb = ImageEmbedder(name, weights=weights_for(name), compile=compiled).fit()
                clear_cache()
                emb.transform(paths[:64])  # warm-up (and compilation), from an empty cache
                clear_cache()
                with Timer() as t:
                    emb.transform(paths)
                steady[compiled] = len(paths) / t.seconds
            clf = PretrainedImageClassifier(name, weights=weights_for(name), compile=True)
            clear_cache()
            clf.fit(paths[::5], labels[::5])  # warm-up on every class
            clear_cache()
            with Timer() as t:
                clf.fit(paths, labels)
            fit_rate = len(paths) / t.seconds
            naive_cold = ours_cold = float("nan")
            if size == args.sizes.split(",")[0] or args.cold_all:  # the target is set on 500x375
                cold_paths, _ = make_photos(work, args.cold_n, (w, h), seed=1)
                cold_listing = work / f"cold-{size}.json"
                cold_listing.write_text(json.dumps(cold_paths))
                naive_cold = run_script(NAIVE, name, weights_for(name), cold_listing)["seconds"]
                ours_cold = run_script(OURS, name, weights_for(name), cold_listing, "auto")["seconds"]
            lines.append(
                f"| {name} | {size} | {rates['eager channels_last']:.1f} | {rates['torch.compile']:.1f} "
                f"| {rates['eager channels_last tuned heap']:.1f} | {rates['torch.compile tuned heap']:.1f} "
                f"| {naive['n'] / naive['seconds']:.1f} | {steady[False]:.1f} | {steady[True]:.1f} "
                f"| {max(steady.values()) / best:.2f} | {max(steady.values()) / best_tuned:.2f} "
                f"| {fit_rate:.1f} | {naive_cold:.1f} | {ours_cold:.1f} "
                f"| {naive_cold / ours_cold:.2f} |"
            )
            print(lines[-1], flush=True)

    clf = PretrainedImageClassifier(random_state=0).fit(paths[::8], labels[::8])  # every class
    one = paths[50]
    clf.predict([one])
    latencies = []
    for _ in range(20):
        clear_cache()
        with Timer() as t:
            clf.predict([one])
        latencies.append(t.seconds * 1000)
    mem = run_script(MEMORY, DATASETS / "flowers5")
    lines += [
        "",
        f"Predicting one {size} photo with a fitted default model, warm, feature cache emptied each time: "
        f"median {np.median(latencies):.0f} ms over 20 calls.",
        "",
        f"Embedding all {mem['n']} photos of `../shared/datasets/flowers5`: peak memory "
        f"{(mem['peak'] - mem['base']) / 2**20:.0f} MB above the loaded model "
        f"(the feature matrix itself is {mem['features_bytes'] / 2**20:.0f} MB).",
    ]
    print("\n".join(lines[-4:]))
    if args.write:
        write_section("throughput", "## Throughput\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
