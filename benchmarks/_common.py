"""Shared by the benchmark scripts: data subsets, a backbone counter, the report file."""

from __future__ import annotations

import json
import os
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
    """Images through a PyTorch module, counted with a forward hook."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]


class Passes:
    """Images sktransfer sends through its backbone, on any engine.

    It wraps the feature stage's backbone pass while installed (a forward hook
    would see PyTorch's passes only, not OpenVINO's); ``remove()`` puts it back.
    """

    def __init__(self):
        import sktransfer._features as features

        self.images = 0
        self._features, self._original = features, features._run_backbone

        def counted(todo, *args, **kwargs):
            self.images += len(todo)
            return self._original(todo, *args, **kwargs)

        features._run_backbone = counted

    def remove(self):
        self._features._run_backbone = self._original


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
    partial = REPORT.with_name(REPORT.name + ".partial")
    partial.write_text(text)
    os.replace(partial, REPORT)  # a reader never sees half a page
    print(f"wrote the {name!r} section of {REPORT.relative_to(ROOT)}")


def add_section_option(parser):
    """``--section SUFFIX``: write the figures of a CPU other than the page's usual one
    into a section of their own, beside the usual one (see :func:`write_figures`)."""
    parser.add_argument(
        "--section", default="", metavar="SUFFIX",
        help="write into the section NAME-SUFFIX, headed with this machine's CPU, and keep the "
             "section of the page's usual CPU (which is replaced without this)")


def write_figures(name, heading, markdown, suffix=""):
    """:func:`write_section` ``name`` headed ``heading``; with a ``suffix``, the section
    ``name-suffix`` instead, its heading one level down and naming this machine's CPU."""
    if suffix:
        name, heading = f"{name}-{suffix}", f"#{heading}: {cpu()}"
    write_section(name, f"{heading}\n\n{markdown}")


#: The CPU flags that decide which engine and precision run fastest.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu():
    """The CPU's model name and the flags of :data:`FLAGS` it has, from /proc/cpuinfo (Linux)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not flags:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{model}, flags {' '.join(f for f in FLAGS if f in flags) or 'none of ' + '/'.join(FLAGS)}"


def machine():
    """The machine a figure was measured on: cores, CPU model and flags, torch and its threads."""
    import torch

    try:
        load = f"; load average {os.getloadavg()[0]:.1f} when written"  # other jobs sharing the cores
    except OSError:
        load = ""
    try:
        usable = len(os.sched_getaffinity(0))  # fewer when pinned (taskset, a container's cpuset)
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    cores = f"{usable} CPU cores" if usable == os.cpu_count() else f"{usable} of {os.cpu_count()} CPU cores"
    return (f"{cores}, {cpu()}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads{load}")


def run_script(code, *args):
    """Run ``code`` in a fresh Python process (from benchmarks/); return the JSON of its last line."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])
