"""device="cuda": embedding throughput on a GPU, and its features against the CPU's.

    python benchmarks/gpu.py [--data FOLDER] [--n 300] [--write]

On real photos (default ``../shared/datasets/trash6``; ``--data`` names a
folder with one sub-folder per class), with the default backbone, whose
weights ship with the package. Reports, median of 3 runs each:

- compute-only img/s on the GPU from decoded pixels in memory (float32, which
  CUDA computes in TF32 by default, and bfloat16 autocast), batch 64;
- steady-state img/s of ``ImageEmbedder(device=...).transform(paths)`` from
  JPEG paths, feature cache emptied, at batch 8 and 64, with the decoding
  threads sktransfer uses on a GPU and with the CPU's rule (at most 4);
- the same on this machine's CPU in PyTorch float32, for scale;
- the least cosine similarity of an image's GPU features to its CPU float32
  features.

Needs a CUDA GPU; ``--write`` puts the table in docs/benchmarks.md.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from _common import DATASETS, Timer, machine, stratified_subset, write_section

N_RUNS = 3


def compute_only(backbone, precision, batch=64, seconds=2.0):
    """img/s of the GPU runner on a batch of uint8 images already in memory."""
    from sktransfer._engine import Plan

    h, w = backbone.preprocessing.crop_shape
    arrays = list(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8))
    run = backbone.runner(Plan("torch", precision), "cuda")
    run(arrays)  # warm-up: cuDNN picks its kernels
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(arrays)  # returns features on the host: each call is synchronised
        done += batch
    return done / (time.perf_counter() - start)


def steady(embedder, paths):
    """Median img/s of ``embedder.transform(paths)`` with the feature cache emptied."""
    from sktransfer import clear_cache

    rates = []
    for _ in range(N_RUNS):
        clear_cache()
        with Timer() as t:
            embedder.transform(paths)
        rates.append(len(paths) / t.seconds)
    return statistics.median(rates)


def cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main():
    import sktransfer._features as features
    from sktransfer import ImageEmbedder, clear_cache

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATASETS / "trash6"))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; torch sees none here.")
    paths, _ = stratified_subset(args.data, args.n)
    gpu = torch.cuda.get_device_name(0)
    print(f"{len(paths)} photos from {args.data}; {gpu}; {machine()}", flush=True)

    embedders = {b: ImageEmbedder(device="cuda", batch_size=b).fit() for b in (8, 64)}
    backbone = embedders[64].backbone_
    rows = [("compute only, float32 (TF32)", f"{compute_only(backbone, 'float32'):.0f}"),
            ("compute only, bfloat16 autocast", f"{compute_only(backbone, 'bfloat16'):.0f}")]
    new_rule = features.decode_workers
    for b, embedder in embedders.items():
        embedder.transform(paths[:b])  # the body is moved to the GPU once
        rows.append((f"from JPEG paths, batch {b}, {new_rule('cuda')} decoding threads",
                     f"{steady(embedder, paths):.0f}"))
        features.decode_workers = lambda device: new_rule("cpu")  # noqa: E731 (the CPU's rule)
        try:
            rows.append((f"from JPEG paths, batch {b}, {new_rule('cpu')} decoding threads (the CPU's rule)",
                         f"{steady(embedder, paths):.0f}"))
        finally:
            features.decode_workers = new_rule
    on_cpu = ImageEmbedder(device="cpu", engine="torch", batch_size=64).fit()
    rows.append((f"CPU of this machine, PyTorch float32, batch 64, {torch.get_num_threads()} threads",
                 f"{steady(on_cpu, paths):.0f}"))

    clear_cache()
    reference = on_cpu.transform(paths)
    agree = {
        "float32 (TF32)": cosines(embedders[64].transform(paths), reference).min(),
        "bfloat16 autocast": cosines(
            ImageEmbedder(device="cuda", precision="bfloat16", batch_size=64).fit().transform(paths),
            reference).min(),
    }

    lines = [
        f"`python benchmarks/gpu.py`: {len(paths)} trash6 camera photos (384×512 JPEG), efficientnet_lite0, "
        f"on {gpu}; {machine()}. Median of {N_RUNS} runs each.",
        "",
        "| path | img/s |",
        "|---|---:|",
        *(f"| {name} | {rate} |" for name, rate in rows),
        "",
        "Least cosine similarity of a photo's GPU features to its CPU float32 features: "
        + ", ".join(f"{k} {v:.5f}" for k, v in agree.items()) + ".",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("gpu", "\n".join(lines))


if __name__ == "__main__":
    main()
