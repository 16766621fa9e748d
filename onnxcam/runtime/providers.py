"""Choosing the device ONNX Runtime runs on, and keeping its start-up noise out of the terminal.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` among the available providers even on a
machine with no GPU or no CUDA libraries; asking a session for it there prints an error block on
stderr and silently falls back to the CPU. So "available" is not "usable": the device is decided
from what a session actually got (``session.get_providers()``), the error block is kept off the
terminal, and the device that really ran is reported.

Devices: ``"cpu"``; ``"cuda"`` (fail with a one-line OptionError when CUDA cannot be used);
``"auto"`` (the default: CUDA when a session really gets it, else the CPU).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading

import onnx
import onnxruntime as ort

from onnxcam.errors import ModelError, OptionError
from onnxcam.graph import external

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

#: ORT log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Sessions log at QUIET:
#: warnings (unused initializers, fallbacks) are noise for a command-line user, errors are kept.
#: Runs log at SILENT: a failing run raises the very text it would log.
QUIET = 3
SILENT = 4

_lock = threading.Lock()
_cuda_state: dict[str, object] = {"usable": None, "reason": ""}  # per process: probe CUDA once
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The C++ file, line and function ahead of onnxruntime's messages ("/onnxruntime_src/...cc:256
#: onnxruntime::Model::Model(...) "): it pushed the reason out of the shortened message.
_SOURCE_LOCATION = re.compile(r"\S+\.(?:cc|cpp|h):\d+ (?:[\w:~<>]+\([^()]*\) )?")
_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def check_device(device: str | None) -> str:
    """``device`` as one of DEVICES (None means "auto"), or an OptionError listing them."""
    if device is None:
        return "auto"
    value = str(device).strip().lower()
    if value == "gpu":
        value = "cuda"
    if value not in DEVICES:
        raise OptionError(f"unknown device {device!r}: choose auto, cpu or cuda")
    return value


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (container and taskset limits), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (its affinity mask, which respects
    container and taskset limits, unlike ORT's default of all physical cores), at most 16.
    ``ONNXCAM_THREADS`` overrides it."""
    value = os.environ.get("ONNXCAM_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise OptionError(f"ONNXCAM_THREADS={value!r} is not a whole number of threads") from None
        if threads < 1:
            raise OptionError(f"ONNXCAM_THREADS={value!r} must be at least 1")
        return threads
    return min(16, usable_cpus())


def session_options(threads: int | None = None, cuda: bool = False) -> ort.SessionOptions:
    """Full graph optimisation, quiet logging, ``threads`` intra-op threads, one inter-op thread,
    and worker threads that stop spinning when a run returns: an explanation alternates between
    sessions (forward part, head, whole model), and on 2 cores the idle spinning threads of one
    session took 20-30% of the next one's time (25 MobileNetV2 forwards: 174 ms after another
    session's run, 137 ms with the spinning stopped; runs of one session lost nothing).
    On CUDA (``cuda``): deterministic kernels, unless ``ONNXCAM_DETERMINISTIC=0``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = QUIET
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if cuda and cuda_deterministic():  # the same seed, the same map: no racing sums (atomics)
        options.use_deterministic_compute = True
    return options


def _environment_switch(name: str) -> bool:
    """A switch that is on unless the environment variable ``name`` says 0 (or false, no)."""
    value = os.environ.get(name, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise OptionError(f"{name}={value!r} must be 1 or 0")
    return value not in ("0", "false", "no")


def cuda_deterministic() -> bool:
    """Whether CUDA sessions ask for deterministic kernels: yes, unless ``ONNXCAM_DETERMINISTIC=0``
    (for measuring what determinism costs: on an H200 the noisy model ran as fast with it as
    without, and plain ``run()`` sessions too, scripts/DEVICE_H200.md)."""
    return _environment_switch("ONNXCAM_DETERMINISTIC")


def cuda_tf32() -> bool:
    """Whether CUDA may multiply in TF32 (10-bit mantissas) on Ampere and newer GPUs: yes, as in
    ONNX Runtime and PyTorch's convolutions, unless ``ONNXCAM_TF32=0``. With it, maps and
    probabilities differ from the CPU's by about 1e-3 of their size; without it, full float32."""
    return _environment_switch("ONNXCAM_TF32")


CUDNN_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def cuda_provider_options() -> dict[str, str]:
    """Options for the CUDA execution provider: TF32 or not (``cuda_tf32``), and how cuDNN picks
    each convolution's algorithm.
    ONNX Runtime's default, EXHAUSTIVE, times every algorithm when a session first meets a shape
    and keeps the fastest, so two processes could pick different algorithms (and round
    differently); HEURISTIC asks cuDNN's heuristics, the same pick every time.
    ``ONNXCAM_CUDNN_SEARCH`` chooses (default EXHAUSTIVE). On an H200 both gave the same speed
    and, in two processes each, the same maps bit for bit (scripts/DEVICE_H200.md)."""
    given = os.environ.get("ONNXCAM_CUDNN_SEARCH", "")
    value = given.strip().upper() or "EXHAUSTIVE"
    if value not in CUDNN_SEARCHES:
        raise OptionError(f"ONNXCAM_CUDNN_SEARCH={given!r} must be one of {', '.join(CUDNN_SEARCHES)}")
    return {"cudnn_conv_algo_search": value, "use_tf32": "1" if cuda_tf32() else "0"}


def cuda_listed() -> bool:
    """Whether this onnxruntime build offers CUDA at all (not whether it works)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def create_session(model: onnx.ModelProto | bytes, device: str | None = "auto", threads: int | None = None,
                   what: str = "the model") -> tuple[ort.InferenceSession, str]:
    """An InferenceSession for ``model`` (a proto, whose external data folder the session is told,
    or serialized bytes) and the device it really runs on ("cuda" or "cpu")."""
    device = check_device(device)
    folder, on_disk = None, 0
    if isinstance(model, onnx.ModelProto):
        folder, on_disk = external.folder_of(model), external.disk_bytes(model)
        model = external.serialize(model, what)
    ort.set_default_logger_severity(QUIET)
    if device in ("auto", "cuda") and cuda_listed() and _cuda_state["usable"] is not False:
        session, reason = _try_cuda(model, threads, what, folder, on_disk)
        if session is not None:
            return session, "cuda"
        if device == "cuda":
            raise OptionError(_cuda_message(reason))
    elif device == "cuda":
        reason = str(_cuda_state["reason"]) if _cuda_state["usable"] is False else (
            "this onnxruntime build has no CUDAExecutionProvider")
        raise OptionError(_cuda_message(reason))
    return _create(model, [CPU_PROVIDER], threads, what, folder, on_disk), "cpu"


def resolve_device(device: str | None) -> str:
    """The device a session asked for ``device`` gets, "cpu" or "cuda", known before the first
    real session: choices such as the batch size and where the noise is made depend on it. For
    "auto" where this onnxruntime offers CUDA, CUDA is tried once per process on a one-node model
    (the same try the first session would make; on a machine without a GPU it fails fast and
    later sessions go straight to the CPU). "cuda" is taken at its word: the session raises if
    CUDA cannot be used."""
    device = check_device(device)
    if device != "auto":
        return device
    if not cuda_listed():
        return "cpu"
    if _cuda_state["usable"] is None:
        _try_cuda(_probe_model(), 1, "a CUDA probe")
    return "cuda" if _cuda_state["usable"] else "cpu"


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "onnxcam_cuda_probe", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def describe(device: str) -> str:
    """A short human name for a device returned by create_session."""
    return {"cuda": "CUDA GPU (onnxruntime CUDAExecutionProvider)",
            "cpu": "CPU (onnxruntime CPUExecutionProvider)"}.get(device, device)


def _cuda_message(reason: str) -> str:
    reason = f" ({reason})" if reason else ""
    return (f"--device cuda was requested but onnxruntime cannot use CUDA{reason}: install "
            "onnxruntime-gpu with matching CUDA and cuDNN libraries (pip install 'onnxcam[cuda]'), "
            "or use --device auto or cpu")


def _try_cuda(model: bytes, threads: int | None, what: str, folder: str | None = None, on_disk: int = 0):
    """Try a CUDA session with ORT's stderr captured; (session, "") or (None, reason)."""
    with _lock:
        _preload_cuda_libraries()
        with _captured_stderr() as captured:
            try:
                session = _create(model, [CUDA_PROVIDER, CPU_PROVIDER], threads, what, folder, on_disk)
            finally:
                ort.set_default_logger_severity(QUIET)
        if CUDA_PROVIDER in session.get_providers():
            _cuda_state["usable"] = True
            return session, ""
        reason = _failure_reason(captured.getvalue())
        _cuda_state.update(usable=False, reason=reason)
        return None, reason


def _preload_cuda_libraries() -> None:
    """Let onnxruntime find CUDA/cuDNN from pip's nvidia-* packages (onnxruntime-gpu >= 1.21);
    its messages go nowhere: whether CUDA works is judged from the session."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or _cuda_state.get("preloaded"):
        return
    _cuda_state["preloaded"] = True
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        preload()


#: onnxruntime (1.31) can lose a tensor when it both removes the Identity that exposes a layer as
#: an output and folds the Pad after that layer into the next Conv (tf2onnx's ZeroPadding2D before
#: a strided conv): the session then fails to load, and loads without that one optimisation.
_IDENTITY_ELIMINATION_BUG = re.compile(r"Node input '[^']*' is not a graph input, initializer, or output of a previous node")


def _create(model: bytes, providers: list[str], threads: int | None, what: str,
            folder: str | None = None, on_disk: int = 0) -> ort.InferenceSession:
    cuda = CUDA_PROVIDER in providers
    options = session_options(threads, cuda)
    if folder is not None:  # the model's external data files (graph.external)
        external.tell_folder(options, folder, on_disk)
    with_options = [(name, cuda_provider_options()) if name == CUDA_PROVIDER else name for name in providers]
    try:
        try:
            return ort.InferenceSession(model, sess_options=options, providers=with_options)
        except Exception as exc:
            if not _IDENTITY_ELIMINATION_BUG.search(str(exc)):
                raise
            return ort.InferenceSession(model, sess_options=options, providers=with_options,
                                        disabled_optimizers=["EliminateIdentity"])
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
        text = " ".join(_ANSI.sub("", str(exc)).split())
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
        text = _SOURCE_LOCATION.sub("", text)
        versions = _IR_TOO_NEW.search(text)
        if versions:
            found, newest = versions.groups()
            raise ModelError(f"the model's IR version {found} is newer than onnxruntime {ort.__version__} "
                             f"reads (at most {newest}): re-save the model with ir_version {newest} "
                             f"(onnx: model.ir_version = {newest}) or upgrade onnxruntime") from None
        raise ModelError(f"onnxruntime cannot load {what} ({text[:300]}): check that the model "
                         "uses operators this onnxruntime version supports") from None


def _failure_reason(text: str) -> str:
    """The useful part of ORT's CUDA error block, on one line ("libcublasLt.so.13: cannot open...")."""
    text = _ANSI.sub("", text)
    for pattern in (r"with error: ([^\n]+)", r"(Failed to create CUDAExecutionProvider[^\n]*)",
                    r"(CUDA[^\n]*(?:error|failed|not)[^\n]*)"):
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return " ".join(match.group(1).split())[:200]
    return "the session fell back to the CPU"


class _Captured:
    def __init__(self) -> None:
        self.text = ""

    def getvalue(self) -> str:
        return self.text


@contextlib.contextmanager
def _captured_stderr():
    """Capture what native code writes to file descriptor 2 (ORT logs there, not to sys.stderr)."""
    captured = _Captured()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): fall back to ORT's own severity
        ort.set_default_logger_severity(4)
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            ort.set_default_logger_severity(QUIET)  # errors are logged, into the sink
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")
