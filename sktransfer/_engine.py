"""Where the frozen body runs: PyTorch (eager or compiled) or OpenVINO, at float32 or bfloat16.

A :class:`Plan` names the engine and the precision; :func:`choose` turns the
user's ``engine=``/``precision=`` (``"auto"`` included) into one for this
machine. The runners turn a batch of preprocessed uint8 images into feature
vectors. They hold runtime handles (compiled graphs, inference requests):
:class:`sktransfer._backbones.Backbone` keeps them per process and never
pickles them, so a loaded model picks the best path of the machine it runs on.

Every path ``"auto"`` may pick keeps features equal to float32 PyTorch
within :data:`MIN_COSINE` (cosine similarity per image, checked on real
photos by the tests for every path the machine can run).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ._cache import _read_regular, digest, namespace
from ._choices import ENGINES, PRECISIONS
from ._outputs import TEMP_PREFIX, make_folders, write_atomic

__all__ = ["ENGINES", "PRECISIONS", "MIN_COSINE", "Plan"]

#: The agreement with float32 PyTorch of every path "auto" may pick: the
#: cosine similarity of each image's features.
MIN_COSINE = 0.999
#: The agreement of the bfloat16 paths, which run only when asked for
#: (``precision="bfloat16"``): every activation is rounded to 8 bits of
#: mantissa. Least cosine over 480 real photos (docs/benchmarks.md):
#: OpenVINO on an Intel Xeon with AMX 0.9926, PyTorch on an NVIDIA H200 0.9919;
#: over 840 on an AMD EPYC with AVX-512 BF16, OpenVINO 0.9814 (1st percentile
#: 0.9940), PyTorch 0.9928. The tests hold the eight photos they embed to it.
MIN_COSINE_BF16 = 0.99

# Converting a body to OpenVINO traces it once (seconds; tens of seconds on a
# busy machine), and the converted graph is kept on disk for later processes.
# Until a body has been converted, engine="auto" converts only for a call that
# embeds enough images to repay it; smaller calls run in PyTorch.
OPENVINO_MIN_IMAGES = 500

_WARNED = set()
_LOCK = threading.Lock()
_CONVERT_LOCK = threading.Lock()


def warn_once(key, message):
    """Warn about ``key`` once per process (a fallback is told once, not every call)."""
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class Plan:
    """An engine and the precision it computes in."""

    engine: str
    precision: str

    def namespace(self, fingerprint, device="cpu"):
        """The feature-cache namespace of a body's features on this plan and ``device``.

        float32 PyTorch on the CPU keeps the body's own fingerprint (features
        cached by earlier releases stay valid); every other plan has its own,
        so a cache never mixes features of different engines or precisions.
        So does every other kind of device: CUDA computes float32
        convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``).
        """
        if self != TORCH_FLOAT32:
            fingerprint = namespace(fingerprint, "engine", self.engine, self.precision)
        kind = torch.device(device).type
        return fingerprint if kind == "cpu" else namespace(fingerprint, "device", kind)


TORCH_FLOAT32 = Plan("torch", "float32")


def check_settings(engine, precision, device, compile):
    """Refuse settings that cannot go together (raised at fit, before any work)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not supported; use one of {list(ENGINES)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of {list(PRECISIONS)}.")
    if engine == "openvino" and torch.device(device).type != "cpu":
        raise ValueError(
            f"engine='openvino' runs on the CPU, but device={str(device)!r}; use engine='torch' "
            "(or 'auto') on a GPU."
        )
    if engine == "openvino" and compile is True:
        raise ValueError(
            "compile=True compiles the PyTorch body with torch.compile, but engine='openvino'; "
            "use engine='torch' with compile=True, or compile='auto'."
        )


@lru_cache(maxsize=1)
def cpu_has_bf16():
    """Whether this CPU computes bfloat16 natively (Intel AMX or AVX-512 BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    core = _openvino_core()  # elsewhere (macOS, Windows), ask the runtime
    return core is not None and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@lru_cache(maxsize=1)
def _openvino_core():
    """OpenVINO's runtime core, or None where the package is missing or broken."""
    try:
        import openvino

        return openvino.Core()
    except Exception as e:  # ImportError, or a wheel that does not load here
        warn_once("openvino-missing", f"OpenVINO is not available here ({type(e).__name__}: {e}); "
                                      "the backbone runs in PyTorch.")
        return None


def choose(engine, precision, device, compile, *, n_images, converted):
    """The plan for a call that embeds up to ``n_images`` images.

    ``converted`` says whether the body is already converted for OpenVINO
    (in this process or on disk). ``"auto"`` picks OpenVINO on the CPU when
    it is installed and no ``torch.compile`` is asked for, at float32: no
    bfloat16 path keeps features within :data:`MIN_COSINE` on real photos
    (:data:`MIN_COSINE_BF16`), so bfloat16 runs only when asked for.
    """
    cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        wanted = cpu and compile is not True and (converted or n_images >= OPENVINO_MIN_IMAGES)
        engine = "openvino" if wanted and _openvino_core() is not None else "torch"
    elif engine == "openvino" and _openvino_core() is None:
        engine = "torch"
    if precision == "auto":
        precision = "float32"
    elif precision == "bfloat16" and cpu and not cpu_has_bf16():
        # Emulated, bfloat16 is no faster in OpenVINO and about 11x slower in PyTorch.
        warn_once("cpu-bf16", "precision='bfloat16' but this CPU has no native bfloat16 "
                              "(AMX or AVX-512 BF16); the backbone computes in float32.")
        precision = "float32"
    return Plan(engine, precision)


# --------------------------------------------------------------------------
# PyTorch

class TorchRunner:
    """The body in PyTorch: eager or ``torch.compile``d, float32 or bfloat16 autocast."""

    def __init__(self, module, preprocessing, device, precision, compiled=None, batch_size=None):
        self.module = module
        self.preprocessing = preprocessing
        self.device = device
        self.precision = precision
        self.compiled = compiled
        self.batch_size = batch_size
        self.channels_last = torch.device(device).type == "cpu"

    def __call__(self, arrays):
        x = self.preprocessing.normalize(arrays, device=self.device, channels_last=self.channels_last)
        autocast = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bfloat16")
        with torch.inference_mode(), autocast:
            if self.compiled is not None:
                try:
                    return self._compiled(x)
                except Exception as e:
                    # Compilation fails at the first call on a machine without
                    # a working C++ toolchain: run eagerly from here on.
                    warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); running eagerly.")
                    self.compiled = None
            return self.module(x).float().cpu().numpy()

    def _compiled(self, x):
        n = x.shape[0]
        if n < self.batch_size:  # pad to the one shape the compiled graph was built for
            x = torch.cat([x, x[:1].expand(self.batch_size - n, *x.shape[1:])])
            x = x.contiguous(memory_format=torch.channels_last)
        return self.compiled(x)[:n].float().cpu().numpy()


def torch_compile(module, name):
    """``torch.compile(module)`` for one fixed batch shape, or None where it is not available."""
    try:
        return torch.compile(module, dynamic=False)
    except Exception as e:  # no compiler, unsupported platform: eager still works
        warnings.warn(f"torch.compile is not available for backbone {name!r} here ({e}); running eagerly.")
        return None


# --------------------------------------------------------------------------
# OpenVINO

def model_cache_folder():
    """Where converted bodies are kept: ``SKTRANSFER_ENGINE_CACHE``, else the user's cache folder."""
    folder = os.environ.get("SKTRANSFER_ENGINE_CACHE")
    if folder:
        return os.path.expanduser(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sktransfer", "openvino")


def _model_path(fingerprint, shape):
    """Where the body of ``fingerprint`` for images of ``shape`` is kept once converted: one
    file per release of torch (whose exporter traces it) and of OpenVINO (which reads it)."""
    import openvino

    key = f"{fingerprint}|{shape}|openvino-{openvino.get_version()}|torch-{torch.__version__}"
    return os.path.join(model_cache_folder(), digest(key.encode()) + ".xml")


def is_converted(fingerprint, shape):
    """Whether a converted body for images of ``shape`` (height, width) is on disk, with
    the record of its digests (False where OpenVINO is missing). Its files are checked
    when :func:`convert` reads them."""
    return _openvino_core() is not None and os.path.lexists(_record_path(_model_path(fingerprint, shape)))


def _record_path(path):
    # Written last, once the .xml and .bin it vouches for are on disk.
    return path[:-4] + ".digests.json"


#: A memo or a record of digests is a few hundred bytes: a larger file is not one.
SMALL_FILE = 1 << 16


def read_small(path):
    """The bytes of the small regular file at ``path`` (a record or a memo in the engine
    cache); ``OSError`` for anything else: a link, a FIFO or a device (never waited on),
    a file over :data:`SMALL_FILE` bytes."""
    return _read_regular(path, limit=SMALL_FILE, follow_links=False)[1]


def converted_identity(fingerprint, preprocessing):
    """What the record beside the converted body of ``fingerprint`` says it was converted
    from (``fingerprint``, ``preprocessing``: its repr, ``num_features``), or None where
    there is no readable record (or no OpenVINO)."""
    if _openvino_core() is None:
        return None
    try:
        record = json.loads(read_small(_record_path(_model_path(fingerprint, preprocessing.crop_shape))))
        return {key: record[key] for key in ("fingerprint", "preprocessing", "num_features")}
    except (OSError, ValueError, TypeError, KeyError):
        return None


class _Damaged(Exception):
    """A file of a converted body that does not match its record: ``args[0]`` is its path."""


def _verified(path, fingerprint, preprocessing):
    """The ``.xml`` and ``.bin`` bytes of the body converted at ``path``, each matching the
    size and digest recorded when it was saved, and the record matching ``fingerprint`` and
    ``preprocessing``; None where there is no record (not converted, or the writer stopped
    before writing it); :class:`_Damaged` naming the first file that does not match."""
    record_path = _record_path(path)
    if not os.path.lexists(record_path):
        return None
    try:
        record = json.loads(read_small(record_path))
        if (record["fingerprint"], record["preprocessing"]) != (fingerprint, repr(preprocessing)):
            raise ValueError("recorded for another body")
        files = [(path[:-4] + suffix, int(record[suffix][0]), str(record[suffix][1])) for suffix in (".xml", ".bin")]
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        raise _Damaged(record_path) from None
    contents = []
    for name, size, expected in files:
        try:
            data = _read_regular(name, size=size, follow_links=False)[1]
        except OSError:  # missing, of another size, a link, a FIFO
            raise _Damaged(name) from None
        if digest(data) != expected:
            raise _Damaged(name)
        contents.append(data)
    return contents


def convert(body, fingerprint, preprocessing, name):
    """The body as an OpenVINO model with a dynamic batch size, read from disk when
    converted before; None (told once) when it cannot be converted. ``body()`` gives
    the PyTorch module, asked for only to convert it.

    Files on disk are read only when they match the digests recorded when they
    were saved, for this ``fingerprint`` and ``preprocessing``, and OpenVINO
    reads the very bytes checked; a file that does not (damaged, truncated,
    missing, replaced) is told in one warning naming it, and the body converted again.

    The body is traced to ONNX by PyTorch's TorchScript-based exporter and read
    by OpenVINO's ONNX front end: about a quarter of the time of OpenVINO's own
    PyTorch front end (``openvino.convert_model``) for the same graph, equal
    features and throughput (docs/benchmarks.md). Where that fails (the ``onnx``
    package missing, an operation without an ONNX form), the PyTorch front end
    converts it.
    """
    core = _openvino_core()
    shape = preprocessing.crop_shape
    path = _model_path(fingerprint, shape)
    try:
        contents = _verified(path, fingerprint, preprocessing)
        if contents is not None:
            return core.read_model(*contents)
    except _Damaged as e:
        warnings.warn(f"The converted backbone {name!r} in {e.args[0]!r} does not match the digest recorded "
                      "when it was saved (damaged, truncated, missing or changed); converting it again.",
                      RuntimeWarning, stacklevel=3)
    except Exception:  # bytes that match but OpenVINO cannot read (another release wrote them): convert again
        pass
    import openvino

    with _CONVERT_LOCK:  # the exporters keep process-wide state: one conversion at a time
        model = _convert(core, openvino, body, fingerprint, shape, name)
    if model is not None:
        _save(openvino, model, path, fingerprint, preprocessing)
    return model


def _convert(core, openvino, body, fingerprint, shape, name):
    h, w = shape
    example = torch.zeros(1, 3, h, w).contiguous(memory_format=torch.channels_last)
    module = body()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python values
            model = core.read_model(onnx_graph(module, example, input_names=["images"],
                                               dynamic_axes={"images": {0: "n"}}))
    except Exception:
        model = None
    if model is None:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on torch.jit
                # One trace, unchecked (checking it traces again: half the conversion's time).
                traced = torch.jit.trace(module, example, check_trace=False)
                model = openvino.convert_model(traced, example_input=example, input=[(-1, 3, h, w)])
        except Exception as e:
            warn_once(("openvino-convert", fingerprint),
                      f"OpenVINO could not convert backbone {name!r} ({type(e).__name__}: {e}); "
                      "it runs in PyTorch.")
            return None
    return model


def onnx_graph(module, example, *, input_names, dynamic_axes, output_names=None, opset=17):
    """``module`` traced on ``example`` to an ONNX graph (bytes) by PyTorch's
    TorchScript-based exporter: a self-contained file in seconds, where the
    ``torch.export``-based one takes minutes for a backbone and needs onnxscript.
    Needs the ``onnx`` package.

    The graph is traced in eval mode, and every layer is left in the mode it
    was in: the exporter itself ends with ``module.train(mode)``, the top
    module's mode, which would also switch layers shared with a frozen body.
    """
    graph = io.BytesIO()
    modes = [(layer, layer.training) for layer in module.modules()]
    # The exporter logs the whole graph when an operation has no ONNX form, to
    # stdout unless told otherwise, where it would mix with a command's output.
    if hasattr(torch._C, "_jit_set_onnx_log_output_stream"):
        torch._C._jit_set_onnx_log_output_stream("stderr")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(module, (example,), graph, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    finally:
        for layer, training in modes:
            layer.training = training
    return graph.getvalue()


def _save(openvino, model, path, fingerprint, preprocessing):
    """Keep the converted model at ``path`` (its ``.xml`` and ``.bin``), then the record of
    their sizes and digests, each written atomically and synced to disk before its rename,
    so a power cut leaves a whole set or no record. A failure costs only a later
    conversion, and is told once."""
    folder = os.path.dirname(path)
    record_path = _record_path(path)
    try:
        make_folders(folder)
        tmp = tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX)
        try:
            openvino.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            files = {suffix: _read_regular(os.path.join(tmp, "model" + suffix))[1] for suffix in (".xml", ".bin")}
        finally:
            for entry in os.listdir(tmp):
                os.unlink(os.path.join(tmp, entry))
            os.rmdir(tmp)
        record = {"fingerprint": fingerprint, "preprocessing": repr(preprocessing),
                  "num_features": model.output(0).get_partial_shape()[1].get_length(),
                  **{suffix: [len(data), digest(data)] for suffix, data in files.items()}}
        try:  # no record while the files change: a reader converts rather than mixing two sets
            os.unlink(record_path)
        except FileNotFoundError:
            pass
        for suffix, data in files.items():
            write_atomic(path[:-4] + suffix, data, follow_links=False)
        write_atomic(record_path, json.dumps(record).encode(), follow_links=False)
    except Exception as e:  # OSError, or OpenVINO's RuntimeError for a write that failed (a full disk)
        warn_once("openvino-save", f"Could not keep the converted backbone in {folder!r} ({e}); "
                                   "later processes convert it again. Set SKTRANSFER_ENGINE_CACHE "
                                   "to a writable folder.")


def compile_openvino(model, preprocessing, precision, threads):
    """Compile ``model`` for the CPU, taking HxWx3 uint8 batches and normalising
    them inside the graph (one fused step instead of three passes in Python)."""
    import openvino
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model.clone())
    ppp.input().tensor().set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
    ppp.input().model().set_layout(openvino.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(openvino.Type.f32) \
        .mean([255.0 * m for m in preprocessing.mean]).scale([255.0 * s for s in preprocessing.std])
    config = {
        "PERFORMANCE_HINT": "LATENCY",  # one request on every thread: the batch is the parallelism
        "INFERENCE_NUM_THREADS": int(threads),
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
        # OpenVINO pins its threads to cores by default on Linux. Our decoding
        # threads, joblib workers and other processes share those cores, and a
        # pinned thread cannot move off a busy one: unpinned, EfficientNet-Lite0
        # ran 1.1-4.8x faster on a shared 2-core machine (docs/benchmarks.md).
        "ENABLE_CPU_PINNING": False,
    }
    return _openvino_core().compile_model(ppp.build(), "CPU", config)


class OpenVINORunner:
    """The body compiled by OpenVINO; one inference request per calling thread."""

    def __init__(self, compiled):
        self.compiled = compiled
        self._local = threading.local()

    def __call__(self, arrays):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        out = request.infer({0: np.stack(arrays)})
        return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its buffer
