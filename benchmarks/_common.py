"""Shared by the benchmark scripts: data subsets, a backbone counter, the report file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
REPORT = ROOT / "docs" / "benchmarks.md"


def stratified_subset(folder, n, seed=0):
    """``n`` paths of ``folder`` (one sub-folder per class), stratified and seeded."""
    from sklearn.model_selection import train_test_split

    from sktransfer import load_image_folder

    paths, labels = load_image_folder(folder)
    if n >= len(paths):
        return paths, labels
    keep, _ = train_test_split(np.arange(len(paths)), train_size=n, stratify=labels, random_state=seed)
    keep = np.sort(keep)
    return [paths[i] for i in keep], labels[keep]


class Counter:
    """Images through a module, counted with a forward hook."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_section(name, markdown):
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    print(f"wrote the {name!r} section of {REPORT.relative_to(ROOT)}")


def machine():
    import os
    import platform

    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def run_script(code, *args):
    """Run ``code`` in a fresh Python process (from benchmarks/); return the JSON of its last line."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])
