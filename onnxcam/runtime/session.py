"""Running a rewritten model: one ONNX Runtime session per model, created once and reused.

``GradientSession.run(inputs, seed)`` runs the whole rewritten model (forward pass, activation,
gradient, logits) on a batch. Two sub-models cut from it at the target layer serve the case where
the seed is not known before the forward pass (the target class is the predicted one):

- the *forward part*, ``input -> (activation, logits)``, a plain forward pass that exposes A;
- the *head*, ``(activation, seed) -> gradient``: the layers after A and the gradient subgraph.

Running the forward part, picking the classes from its logits and then the head costs one forward
pass plus the head (for the usual last-layer choice, global pooling and one linear layer: nearly
nothing), where two runs of the whole model would cost two forward passes. The cut is possible
when every path from the input to the score passes through the layer (true for the automatic
choice); otherwise ``has_split`` is False and callers run the whole model twice.

A fourth model, the *noisy* one (``onnxcam.graph.noisy``), makes the noisy batch in the graph:
``bind_noise`` puts the clean images and the bank of standard normal samples on the session's
device once per call (ONNX Runtime I/O binding; the images refill one buffer in place and stay
bound, like the bank while its seed holds), then each ``run_noisy`` sends only small per-row
vectors (image, sample, scale, class) and fetches only the outputs asked for: on a GPU, the noisy
inputs never cross the bus, and Smooth Grad-CAM++ fetches three moment sums per run.

A fifth, the *picking* one, is the whole model with the noisy model's class picking and the
model's own input (``run_picking``): on the CPU, NumPy makes the noisy batches, and an image's clean
row rides in its first noisy batch even when its class is the predicted one. The noisy model's
*input* form (``run_noisy(front="input")``) is fed such a batch too, and sums the moments in the
graph: the CPU's usual Smooth Grad-CAM++ runs.

``run_calls`` counts every ``InferenceSession.run`` (all models), ``calls`` per model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx.utils import Extractor

from onnxcam.graph import external, noisy
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, GradientModel
from onnxcam.runtime.cache import mark_weights_used
from onnxcam.runtime.providers import SILENT, check_device, create_session, resolve_device

FULL, FORWARD, HEAD, NOISY, NOISY_INPUT, PICKING = "full", "forward", "head", "noisy", "noisy_input", "picking"


class GradientSession:
    """Sessions for one GradientModel on one device; created lazily, each at most once."""

    def __init__(self, gradient_model: GradientModel, device: str | None = "auto",
                 threads: int | None = None) -> None:
        self.gradient_model = gradient_model
        self.requested_device = check_device(device)
        self.threads = threads
        self.device: str | None = None  # "cpu" or "cuda" once a session exists
        self.run_calls = 0
        # a failing run raises with the same text that ONNX Runtime would also log, in colour
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = SILENT
        self.calls: Counter[str] = Counter()
        self.equal_runs: bool | None = None  # pad a pass's runs to one size: None means on CUDA
        self._sessions: dict[str, object] = {}
        self._parts: dict[str, onnx.ModelProto] | None = None
        self._split_possible: bool | None = None
        self._bound: dict[str, ort.OrtValue] = {}
        # their shapes, kept here: OrtValue.shape() of a CUDA value took ~0.3 ms on an H200's host
        self._bound_shapes: dict[str, tuple[int, ...]] = {}
        self._bindings: dict[str, tuple[ort.IOBinding, dict[str, ort.OrtValue]]] = {}
        self._noise_key: object = None
        graph = gradient_model.model.graph
        dtypes = {value.name: np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
                  for value in [*graph.input, *graph.output]}
        self.input_dtype = dtypes[gradient_model.input_name]
        # a float16 model with float32 inputs and outputs has float16 layers and maybe scores
        self.seed_dtype, self.layer_dtype = dtypes.get(SEED, self.input_dtype), dtypes.get(ACTIVATION, self.input_dtype)

    # -- public runs -------------------------------------------------------------------------
    def run(self, inputs: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(activation, gradient, logits) of the whole model for a batch and its seed rows."""
        gm = self.gradient_model
        session = self._session(FULL)
        activation, gradient, logits = self._run(FULL, session, [ACTIVATION, GRADIENT, LOGITS],
                                                 {gm.input_name: self._as_input(inputs),
                                                  SEED: self._as_input(seed, self.seed_dtype)})
        return activation, gradient, logits

    def forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(activation, logits) of the forward part alone (needs ``has_split``)."""
        session = self._session(FORWARD)
        activation, logits = self._run(FORWARD, session, [ACTIVATION, LOGITS],
                                       {self.gradient_model.input_name: self._as_input(inputs)})
        return activation, logits

    def head(self, activation: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """The gradient for given activations and seed rows, from the head alone (needs ``has_split``)."""
        session = self._session(HEAD)
        (gradient,) = self._run(HEAD, session, [GRADIENT],
                                {self.gradient_model.layer: self._as_input(activation, self.layer_dtype),
                                 SEED: self._as_input(seed, self.seed_dtype)})
        return gradient

    def run_picking(self, inputs: np.ndarray, targets: np.ndarray, picks: np.ndarray,
                    outputs: tuple[str, ...] = (ACTIVATION, GRADIENT, LOGITS, noisy.CLASSES)) -> list[np.ndarray]:
        """``outputs`` of the whole model for a batch whose classes are picked in the graph
        (``noisy.build_picking_model``): row i explains ``targets[i]``, or where that is -1 the
        top prediction of row ``picks[i]``."""
        session = self._session(PICKING)
        return self._run(PICKING, session, list(outputs),
                         {self.gradient_model.input_name: self._as_input(inputs),
                          noisy.TARGETS: np.ascontiguousarray(targets, dtype=np.int64),
                          noisy.PICKS: np.ascontiguousarray(picks, dtype=np.int64)})

    def bind_noise(self, images: np.ndarray | None, noise_key: object = None, make_noise=None) -> None:
        """Put the clean images (None: keep the bound ones) and the bank of standard normal
        samples on the noisy model's device. ``make_noise()`` gives the (samples, ...) bank; it
        is called only when ``noise_key`` differs from the previous call's, so the bank stays on
        the device between calls. Without ``make_noise`` (clean rows only, scale 0) any bound
        bank of the images' shape will do, else one zero sample is bound."""
        self._session(NOISY)
        device = "cuda" if self.device == "cuda" else "cpu"
        if images is not None:
            images = self._as_input(images)
            bound = self._bound.get(noisy.IMAGES)
            if bound is None or self._bound_shapes[noisy.IMAGES] != images.shape:
                # memory of ONNX Runtime's own, on the CPU too (an OrtValue made from NumPy there
                # is the caller's array, which the next call's images must not overwrite)
                bound = self._bind_value(noisy.IMAGES, ort.OrtValue.ortvalue_from_shape_and_type(
                    images.shape, images.dtype, device, 0), images.shape)
            bound.update_inplace(images)  # the same buffer, still bound: no rebinding
        sample_shape = self._bound_shapes[noisy.IMAGES][1:]
        bank = self._bound.get(noisy.NOISE)
        if make_noise is None:
            if bank is None or self._bound_shapes[noisy.NOISE][1:] != sample_shape:
                zero = np.zeros((1, *sample_shape), dtype=self.input_dtype)
                self._bind_value(noisy.NOISE, ort.OrtValue.ortvalue_from_numpy(zero, device, 0), zero.shape)
                self._noise_key = None
        elif self._noise_key != noise_key or bank is None:
            self._bound.pop(noisy.NOISE, None)  # free the old bank before making the new one
            self._bindings.pop(NOISY, None)  # (its binding holds it too)
            bank_values = self._as_input(make_noise())
            self._bind_value(noisy.NOISE, ort.OrtValue.ortvalue_from_numpy(bank_values, device, 0), bank_values.shape)
            self._noise_key = noise_key

    def _bind_value(self, name: str, value: ort.OrtValue, shape: tuple[int, ...]) -> ort.OrtValue:
        """Keep ``value`` as the device value of ``name``, with its shape."""
        self._bound[name], self._bound_shapes[name] = value, tuple(int(n) for n in shape)
        return value

    def run_noisy(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = (GRADIENT,),
                  front: str = "bank", pad_to: int | None = None) -> list[np.ndarray]:
        """``outputs`` of the noisy model for one batch (``noisy.row_feeds``), fetched to the
        host: after ``bind_noise`` for the bank front; for the input front (``front="input"``)
        ``feeds`` hold the noisy batch itself. With ``pad_to`` and ``pads_runs`` a shorter run
        is padded to that many rows of weight 0 (``noisy.padded_row_feeds``)."""
        rows = len(feeds[noisy.WEIGHTS])
        padded = pad_to is not None and pad_to > rows and self.pads_runs
        if padded:
            feeds = noisy.padded_row_feeds(feeds, pad_to)
        fetched = self._run_noisy(feeds, outputs, front)
        if padded:
            fetched = [values[:rows] if name in noisy.ROW_OUTPUTS else values
                       for name, values in zip(outputs, fetched)]
        return fetched

    @property
    def pads_runs(self) -> bool:
        """Whether the runs of one pass are padded to one size (``equal_runs``; None: on CUDA).
        On an H200, configurations that alternated a session's batch size ran 75-325x slower
        than the same calls repeated (cuDNN's algorithm search seemingly redone at every change
        of shape, scripts/DEVICE_H200.md): n = 50 samples, 26 and 25 rows, would alternate."""
        return self.equal_runs if self.equal_runs is not None else self.planned_device == "cuda"

    def _run_noisy(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...], front: str) -> list[np.ndarray]:
        kind = NOISY_INPUT if front == "input" else NOISY
        binding, bound_values = self._binding(kind)
        if kind == NOISY:
            for name in (noisy.IMAGES, noisy.NOISE):
                if bound_values.get(name) is not self._bound[name]:
                    binding.bind_ortvalue_input(name, self._bound[name])
                    bound_values[name] = self._bound[name]
        for name, values in feeds.items():
            binding.bind_cpu_input(name, values)
        binding.clear_binding_outputs()
        for name in outputs:
            binding.bind_output(name, "cpu")
        session = self._session(kind)
        self.run_calls += 1
        self.calls[kind] += 1
        session.run_with_iobinding(binding, self._run_options)
        return binding.copy_outputs_to_cpu()

    @property
    def planned_device(self) -> str:
        """The device the sessions run on, known before the first one exists
        (``providers.resolve_device``)."""
        return self.device or resolve_device(self.requested_device)

    @property
    def has_split(self) -> bool:
        """Whether the model can be cut at the layer into forward part and head."""
        if self._split_possible is None:
            self._parts = _split(self.gradient_model)
            self._split_possible = self._parts is not None
        return self._split_possible

    def warm_up(self, kinds: tuple[str, ...] = (FULL,)) -> None:
        """Create the sessions of ``kinds`` now (to time set-up apart from the runs)."""
        for kind in kinds:
            self._session(kind)

    # -- internals ---------------------------------------------------------------------------
    def _as_input(self, values: np.ndarray, dtype=None) -> np.ndarray:
        return as_input_dtype(values, dtype or self.input_dtype)

    def _run(self, kind: str, session, names: list[str], feeds: dict) -> list[np.ndarray]:
        self.run_calls += 1
        self.calls[kind] += 1
        return session.run(names, feeds, self._run_options)

    def _binding(self, kind: str) -> tuple[ort.IOBinding, dict[str, ort.OrtValue]]:
        """The I/O binding of the ``kind`` session, kept between runs, and the device values
        bound in it: binding a device value cost ~0.2 ms on an H200's host (a tenth of a small
        model's forward pass), so the image and the bank stay bound while they are the same."""
        if kind not in self._bindings:
            self._bindings[kind] = (self._session(kind).io_binding(), {})
        return self._bindings[kind]

    def _session(self, kind: str):
        session = self._sessions.get(kind)
        if session is not None:
            return session
        if kind == FULL:
            model, what = self.gradient_model.model, "the rewritten model"
        elif kind == NOISY:
            model, what = noisy.build_noisy_model(self.gradient_model), "the rewritten model's noisy front"
        elif kind == NOISY_INPUT:
            model, what = (noisy.build_noisy_model(self.gradient_model, front="input"),
                           "the rewritten model's moment sums")
        elif kind == PICKING:
            model, what = noisy.build_picking_model(self.gradient_model), "the rewritten model with its classes picked in the graph"
        else:
            if not self.has_split:
                raise RuntimeError("this layer does not split the model; use run()")
            model, what = self._parts[kind], f"the rewritten model's {kind} part"
        # the first session settles "auto"; later ones go straight to the same device
        device = self.device or self.requested_device
        mark_weights_used(model)  # the cache keeps a weights file for an hour after its last use
        session, self.device = create_session(model, device, self.threads, what)
        self._sessions[kind] = session
        return session


def as_input_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` as a contiguous array of a model input's ``dtype``. Into an integer input (uint8
    pixels) floats are rounded and held to the type's range: a plain cast would truncate, and
    wrap a noisy -3 to 253 and 260 to 4."""
    dtype = np.dtype(dtype)
    values = np.asarray(values)
    if dtype.kind in "iu" and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return np.ascontiguousarray(values, dtype=dtype)


def _split(gm: GradientModel) -> dict[str, onnx.ModelProto] | None:
    """The forward part and the head of the rewritten model, or None when the layer does not
    separate the input from the score (a named layer beside a skip connection)."""
    if gm.layer_layout != "NCHW":  # the head would take the layer in its own layout, A is NCHW
        return None
    try:
        extractor = Extractor(gm.model)
        head = extractor.extract_model([gm.layer, SEED], [GRADIENT])
        forward = extractor.extract_model([gm.input_name], [ACTIVATION, LOGITS])
    except Exception:  # noqa: BLE001 - any failure to cut just means "run the whole model"
        return None
    if not _self_contained(head) or not _self_contained(forward):
        return None
    for part in (head, forward):
        part.ir_version = gm.model.ir_version
        del part.metadata_props[:]
        external.set_folder(part, external.folder_of(gm.model))
    return {FORWARD: forward, HEAD: head}


def _self_contained(model: onnx.ModelProto) -> bool:
    """Every node input is produced in the graph, an initializer, or a graph input."""
    graph = model.graph
    known = {""} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        if any(name not in known for name in node.input):
            return False
        known.update(node.output)
    try:
        onnx.checker.check_model(external.checkable(model))
    except Exception:  # noqa: BLE001
        return False
    return True
