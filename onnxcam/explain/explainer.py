"""The public API: ``Explainer(model).explain(images)`` -> one ``Explanation`` per image and class.

Pipeline for a group of images (a call is processed in groups, so memory stays bounded for a
folder of any size; the results do not depend on the grouping). This module decides which
passes run; ``onnxcam.explain.passes`` runs them:

1. Load and preprocess the images into one float batch.
2. Clean pass, in chunks of ``batch_size``: the target layer's activation A, the gradient g of
   the score and the logits. When the classes are given, one run of the rewritten model per
   chunk (seed = one-hot rows). When they are the predicted ones (the default), the seeds are not
   known before the forward pass; instead of running the whole model twice (a zero seed to get the
   logits, then the real seeds) the model is cut at the layer: the forward part gives A and the
   logits, the classes are picked, then the *head* (the layers after A plus the gradient
   subgraph) gives g from A. That is one forward pass plus the head, which for the usual last
   layer (global pooling + one linear layer) is almost free. Top-k reuses A for the k classes.
   (Two runs of the whole model are used instead when the layer does not cut the model -- a
   layer beside a skip connection -- or when the noisy passes need the whole model anyway and
   all images fit in one batch: then two small runs are cheaper than two more sessions.)
3. Methods that need noise (Smooth Grad-CAM++): ``samples`` noisy copies of every image, in
   chunks of ``batch_size`` across images, each sample's gradient added to a running-moment
   accumulator (never all samples in memory), and the CAM computed with the *clean* A.
   Exact shortcut: when the path from the layer to the score is linear (global average pooling +
   a linear layer), every noisy gradient equals the clean one, so for the "moments" averaging
   the noisy passes are skipped; the record says ``noisy_passes_skipped: true``.
   With one class per image (given, or the top prediction) steps 2 and 3 share their runs: each
   image's clean row comes just before its noisy rows, and the graph picks the class the noisy
   rows of the same run explain (``passes.picked_passes``). That saves the separate clean run.
4. Maps are computed at layer resolution (``raw_map``) and upsampled/normalised on demand.

Smooth Grad-CAM++ with moments averaging and one class per image goes through the noisy model
(``onnxcam.graph.noisy``; ``noise_in_graph``, automatic) on the CPU and on CUDA: the clean row
rides in each image's first noisy run, its class is picked in the graph, and the graph sums the
moments, so one image with n < batch is one run and only the moment sums come back
(``passes.fused_passes``). On CUDA the noisy batch is made in the graph from a bank kept on the
device; on the CPU NumPy makes it just before each run (a model input made inside the graph
slowed ONNX Runtime's in-place residual convolutions). On CUDA every other single-class run
goes through the noisy model too, fed by I/O binding: the clean pass is a run with scale 0 whose
rows pick their own class in the graph. Top-k and neuron scores keep the steps above without the
shared runs.

Determinism: noisy sample s of every image uses the standard normal array z_s of generator (seed,
s) (common random numbers, ``onnxcam.explain.noise``), so the same seed gives the same map bit for
bit for the same batch size, whichever other images share the call. Where the graph sums the
moments (float32, a run at a time) another batch size moves the map by rounding only; the NumPy
paths (``noise_in_graph=False``) accumulate every sample's gradient in float64, sample by sample
in sample order, and give the same bits for any batch size.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxcam.cams import CamMethod, GradientMoments, get_method
from onnxcam.errors import ImageError, LayerError, ModelError, OptionError, TargetError
from onnxcam.explain import targets as tg
from onnxcam.explain.labels import metadata_value, resolve_labels
from onnxcam.explain import passes
from onnxcam.explain.images import ImageReader, Item
from onnxcam.explain.noise import check_noise_options
from onnxcam.explain.regions import PixelClasses
from onnxcam.explain.result import Explanation
from onnxcam.explain.sidecar import read_sidecar
from onnxcam.graph import noisy
from onnxcam.graph.input_size import check_size, require_static_size, sidecar_size, with_input_size
from onnxcam.graph.locate import scores_output_name
from onnxcam.graph.prepare import with_options
from onnxcam.graph.rewrite import GradientModel
from onnxcam.imaging import Preprocessor, detect_layout, get_preset
from onnxcam.imaging.fit import check_interpolation, check_resize
from onnxcam.imaging.input_scaling import input_scaling
from onnxcam.runtime.cache import load_gradient_model
from onnxcam.runtime.prefetch import prefetched
from onnxcam.runtime.providers import check_device
from onnxcam.runtime.session import FULL, NOISY, NOISY_INPUT, PICKING, GradientSession

#: Memory bound for one batch's inputs, widest step, activations and gradients (automatic batch
#: size): VGG-16's 25 MiB an image at its first block allows 9 or 10 rows, by layer.
BATCH_MEMORY = 256 * 2**20
#: Measured on 2 cores (scripts/bench.py's models, one image with n = 25 samples: 26 rows with
#: the clean one): two runs of 13 took 3-6% less time than four runs of 6-7 on MobileNetV2,
#: EfficientNet-Lite0 and VGG-16, the same on ResNet-50; Grad-CAM++ of 25 images took the same
#: time at 8 and 16 rows. 13 = the paper's n = 25 in two runs, and no larger: ONNX Runtime's
#: arena grows in steps, and n = 200 in runs of 16 rows took 1.28x the peak memory of n = 25 in
#: runs of 13 on MobileNetV2 (runs of 13 for both: 1.07x).
MAX_BATCH = 13
#: On a GPU one run of many rows costs little more than one of a few (the kernels are not full
#: at batch 8): a Smooth Grad-CAM++ image with n = 25 then fits in one run with its clean row.
CUDA_BATCH_MEMORY = 1024 * 2**20
CUDA_MAX_BATCH = 32
#: Memory bound for one group of images' preprocessed inputs, clean A and g and moment sums.
GROUP_MEMORY = 256 * 2**20
MAX_GROUP_BATCHES = 8

COMPARE_METHODS = ("gradcam", "gradcampp", "smoothgradcampp")


class Explainer:
    """Gradient CAMs for one ONNX image model.

    ``model``: path of an .onnx file (or an onnx.ModelProto). ``layer``: target layer, a tensor or
    node name (default: the last layer that every path to the logits passes through; see
    ``onnxcam inspect``). ``score``: a tensor name for neuron-level CAMs (then pass ``neuron=`` to
    explain). ``device``: "auto" (default: CUDA when a session really gets it), "cpu" or "cuda".
    ``batch_size``: images or noisy samples per run (default: chosen from the input, widest step
    and layer sizes under a 256 MiB bound, 1 to 13 on the CPU; 1 GiB and 32 on CUDA).
    ``preprocess``: a preset name (imagenet, caffe, unit, symmetric, raw; default: the model's
    metadata onnxcam.mean/std, else imagenet); ``mean``/``std``
    override it; ``size`` = (H, W) for models with a dynamic input size. ``resize``: how an image
    gets to the model's size, "stretch" (the whole image, the default), "crop" (resize so that
    size / ``crop_fraction``, 0.875 by default, covers it, and take the centre: torchvision's
    Resize(256) + CenterCrop(224)), "stretch-crop" (resize to size / ``crop_fraction``, take the
    centre) or "pad" (letterbox); ``interpolation``: Pillow's filter (bilinear, bicubic, nearest,
    lanczos, box, hamming). Each defaults to the model's metadata (onnxcam.resize,
    onnxcam.crop_fraction, onnxcam.interpolation), else what a Hugging Face
    preprocessor_config.json or a timm config.json next to the model says (mean and std, size,
    crop, resampling, class names: see ``onnxcam.explain.sidecar``), else stretch and bilinear.
    ``labels``: a file or a
    list of class names (default: metadata onnxcam.labels, or ImageNet for 1000 classes).
    ``cache``: keep rewritten models in the disk cache ($ONNXCAM_CACHE_DIR or ~/.cache/onnxcam).
    ``noise_in_graph``: make Smooth Grad-CAM++'s noisy batches inside the model, from the clean
    images and a noise bank (on the device, I/O binding), and sum the moments there; None
    (default) does so on CUDA, where it keeps the noisy inputs off the bus, and on the CPU for
    moments averaging with one class per image, where NumPy's noise and float64 sums cost 5-10%
    more; False makes the noise with NumPy (the same maps for any batch size, bit for bit).
    Memory stays bounded by the batch whatever the number of samples. ``inputs``: values for the
    model's inputs other than the image ({"scale_factor": 1.0}: a number, an array or a .npy
    path), which become constants before the rewrite. ``scores_output``: the output that holds the
    class scores, for a model with several (default: the metadata onnxcam.scores, else the first
    output named like logits, scores or probabilities, else the first).

    The rewrite and the runtime sessions are made once per (layer, score) and reused.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, layer: str | None = None,
                 device: str | None = None, score: str | None = None, batch_size: int | None = None,
                 preprocess: str | None = None, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None, size: Sequence[int] | None = None,
                 labels: str | os.PathLike | Sequence[str] | None = None, cache: bool = True,
                 threads: int | None = None, noise_in_graph: bool | None = None,
                 inputs: Mapping[str, Any] | None = None, resize: str | None = None,
                 crop_fraction: float | None = None, interpolation: str | None = None,
                 scores_output: str | None = None) -> None:
        self.model_source = model
        self.model_name = "<ModelProto>" if isinstance(model, onnx.ModelProto) else os.fspath(model)
        self.requested_device = check_device(device)
        self.use_cache = bool(cache)
        self.threads = threads
        self._batch_option = _check_batch_size(batch_size)
        if noise_in_graph not in (None, True, False):
            raise OptionError(f"noise_in_graph {noise_in_graph!r} must be True, False or None (automatic)")
        self.noise_in_graph = noise_in_graph
        self._models: dict[tuple, GradientModel] = {}
        self._sessions: dict[tuple, GradientSession] = {}
        self.setup_timings: dict[str, float] = {}
        self._unreported_setup: dict[str, float] = {}
        self._default_key = (layer, score)
        self.model_source = with_options(model, inputs, scores_output)
        self.sidecar = read_sidecar(model)
        if size is None:
            size = sidecar_size(self.model_source, self.sidecar)
        if size is not None:  # a dynamic input size becomes static before the rewrite
            self.model_source = with_input_size(self.model_source, check_size(size))
        try:
            gm = self._gradient_model(layer, score)
        except LayerError:
            if size is None:
                require_static_size(model)
            raise
        self.gradient_model = gm
        self.from_cache = self.setup_timings.get("from_cache", False)
        self._squash = _squashing(gm.model)
        self._setup_preprocessing(gm, preprocess, mean, std, size, resize, crop_fraction, interpolation)
        self.labels, self.labels_source = resolve_labels(
            gm.num_classes, labels, gm.model,
            sidecar=(self.sidecar.labels, self.sidecar.labels_source) if self.sidecar and self.sidecar.labels else None)

    # -- properties ----------------------------------------------------------------------------
    @property
    def layer(self) -> str:
        return self.gradient_model.layer

    @property
    def score(self) -> str | None:
        """The score tensor for neuron-level maps; None for class scores (the logits)."""
        return None if self.gradient_model.is_class_score else self.gradient_model.score

    @property
    def num_classes(self) -> int | None:
        return self.gradient_model.num_classes

    @property
    def path_is_linear(self) -> bool:
        return self.gradient_model.path_is_linear

    @property
    def candidates(self):
        return self.gradient_model.candidates

    @property
    def input_shape(self) -> tuple:
        return self.gradient_model.input_shape

    @property
    def device(self) -> str:
        """"cpu" or "cuda": the device the sessions really run on (creates the session if needed)."""
        session = self._session(self.gradient_model)
        if session.device is None:  # the session the default method (Smooth Grad-CAM++) uses
            picking = noisy.targets_in_graph(session.gradient_model)
            in_graph = self._noise_in_graph(session, fused=picking)
            kind = self._fused_kind(session) if picking else NOISY
            session.warm_up((kind,) if in_graph else (PICKING,) if picking else (FULL,))
        return session.device  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        return self._batch_for(self.gradient_model)

    @property
    def session(self) -> GradientSession:
        """The runtime session of the default (layer, score); ``run_calls`` counts its runs."""
        return self._session(self.gradient_model)

    def label_of(self, class_index: int) -> str:
        if self.labels is not None and 0 <= class_index < len(self.labels):
            return self.labels[class_index]
        return f"class {class_index}"

    # -- the API -------------------------------------------------------------------------------
    def explain(self, images, method: str = "smoothgradcampp", targets=None, top_k: int = 1,
                samples: int = 25, noise_level: float = 0.15, seed: int | None = 0,
                feature_maps: Sequence[int] | None = None, neuron=None, *, layer: str | None = None,
                score: str | None = None, **method_options) -> list[Explanation]:
        """Explain ``images`` with ``method``; one Explanation per image and class, image by image.

        ``images``: a path, a PIL image, a list of them, or a preprocessed NumPy batch (N,C,H,W) or
        (N,H,W,C) matching the model input. ``targets``: None (the top-1 predicted class, or the
        ``top_k`` best), a class for every image, or one class (or list of classes) per image; a
        class is an index or a name in the Explainer's ``labels`` ("tabby"). ``samples``,
        ``noise_level`` (sigma = noise_level * (max(x) - min(x)) per image) and ``seed`` drive
        the noise of Smooth Grad-CAM++. ``feature_maps``: restrict the final sum to these channels.
        ``neuron``: index tuple(s) into the score tensor (needs ``score``). Method variants as
        keywords, e.g. ``numerator="D1"``, ``averaging="maps"``, ``denominator="weighted"``.
        ``layer``/``score`` override the Explainer's for this call.
        """
        results = self.compare(images, methods=(method,), targets=targets, top_k=top_k,
                               samples=samples, noise_level=noise_level, seed=seed,
                               feature_maps=feature_maps, neuron=neuron, layer=layer, score=score,
                               method_options={_method_key(method): method_options})
        return next(iter(results.values()))

    def compare(self, images, methods: Sequence[str] = COMPARE_METHODS, targets=None, top_k: int = 1,
                samples: int = 25, noise_level: float = 0.15, seed: int | None = 0,
                feature_maps: Sequence[int] | None = None, neuron=None, *, layer: str | None = None,
                score: str | None = None,
                method_options: dict[str, dict[str, Any]] | None = None) -> dict[str, list[Explanation]]:
        """Several methods from one set of passes: {method: [Explanation, ...]} (same order as
        ``explain``). ``method_options`` maps a method name to its keyword options."""
        results: dict[str, list[Explanation]] = {}
        for _index, per_method in self.iter_explain(
                images, methods=methods, targets=targets, top_k=top_k, samples=samples,
                noise_level=noise_level, seed=seed, feature_maps=feature_maps, neuron=neuron,
                layer=layer, score=score, method_options=method_options):
            for name, explanations in per_method.items():
                for explanation in explanations:
                    explanation._image = None if explanation.source else explanation._image
                results.setdefault(name, []).extend(explanations)
        return results

    def iter_explain(self, images, methods: Sequence[str] = ("smoothgradcampp",), targets=None,
                     top_k: int = 1, samples: int = 25, noise_level: float = 0.15,
                     seed: int | None = 0, feature_maps: Sequence[int] | None = None, neuron=None, *,
                     layer: str | None = None, score: str | None = None,
                     method_options: dict[str, dict[str, Any]] | None = None,
                     on_unreadable: Callable[[int, ImageError], None] | None = None,
                     ) -> Iterator[tuple[int, dict[str, list[Explanation]]]]:
        """Like ``compare`` but yields (image index, {method: [Explanation...]}) image by image,
        as soon as each group of images is done (for progress bars and streaming writes).

        Everything that can be checked before running (options, targets, array shapes) is checked
        first; image files are read group by group, so a bad file stops the run where it is met.
        With ``on_unreadable``, an image file that cannot be read or preprocessed is skipped
        instead: ``on_unreadable(index, error)`` is called, in this thread, before its group's
        images are yielded, and nothing is yielded for it (a folder run need not stop at the
        one corrupt file among thousands).
        """
        gm = self._gradient_model(*self._key(layer, score))
        session = self._session(gm)
        method_options = {_method_key(k): dict(v) for k, v in (method_options or {}).items()}
        cams = self._methods(methods, feature_maps, method_options)
        items = self._images.items(images)
        neuron_mode = not gm.is_class_score
        neurons = None
        if neuron_mode:
            if targets is not None:
                raise TargetError("targets are class indices; with a score tensor give neuron= instead")
            neurons = tg.check_neurons(neuron, gm.seed_shape, gm.score)
            class_lists, k = None, 1
        else:
            if neuron is not None:
                raise TargetError("neuron= needs a score tensor: create the Explainer with "
                                  "score='TENSOR' (--score), or explain a class with targets=")
            if gm.num_classes is None:
                raise ModelError("the model's number of classes is not fixed (symbolic logits shape): "
                                 "re-export it with a static class dimension")
            class_lists = tg.class_targets(targets, len(items), gm.num_classes, self.labels)
            k = tg.check_top_k(top_k, gm.num_classes) if class_lists is None else 1
        regions = (PixelClasses.of(gm.num_classes, gm.class_grid, self._squash, self.labels, gm.class_axis)
                   if gm.class_grid is not None and not neuron_mode else None)
        noisy = [cam for cam in cams.values() if cam.needs_noise]
        samples, noise_level, seed = (check_noise_options(samples, noise_level, seed) if noisy
                                      else (samples, noise_level, seed))
        skip_noise = {name: (cam.needs_noise and gm.path_is_linear
                             and getattr(cam, "averaging", "moments") == "moments")
                      for name, cam in cams.items()}
        # the clean gradient only feeds the methods without noisy passes; when every method runs
        # its own noisy passes, the clean pass needs A and the logits only (one forward pass)
        need_gradient = any(not cam.needs_noise or skip_noise[name] for name, cam in cams.items())
        batch = self._batch_for(gm)
        group = self._group_for(gm, batch)
        preprocessor = self._preprocessor_for(items)

        noisy_cams = {name: cam for name, cam in cams.items() if cam.needs_noise and not skip_noise[name]}
        one_class = self._one_class_picked(session, class_lists, k, neuron_mode)
        moments_only = bool(noisy_cams) and all(
            getattr(cam, "averaging", "moments") == "moments" for cam in noisy_cams.values())
        in_graph = one_class and self._noise_in_graph(session, fused=moments_only)
        fused = in_graph and moments_only
        picked = one_class and not in_graph and bool(noisy_cams)
        in_graph_kind = self._fused_kind(session) if fused else NOISY
        plan, split_clean = (((in_graph_kind,), False) if in_graph else ((PICKING,), False) if picked else
                             passes.plan_sessions(session, class_lists, k, neuron_mode, len(items), batch,
                                                  bool(noisy_cams), regions=regions is not None))
        setup_start = time.perf_counter()
        session.warm_up(plan)
        setup = time.perf_counter() - setup_start + self._unreported_setup.pop(gm.layer, 0.0)

        groups = self._images.groups(items, group, preprocessor, self.session_dtype,
                                     skip_unreadable=on_unreadable is not None)
        if len(items) > 1:  # decode the next group's images while this one runs
            groups = prefetched(groups)
        for start, chunk, (inputs, pictures, sizes, arrays, unreadable), preprocess_s in groups:
            chunk_classes = class_lists[start:start + len(chunk)] if class_lists is not None else None
            if unreadable:
                for position, error in unreadable:
                    on_unreadable(chunk[position].index, error)  # type: ignore[misc]
                skipped = {position for position, _ in unreadable}
                kept = [position for position in range(len(chunk)) if position not in skipped]
                chunk = [chunk[position] for position in kept]
                chunk_classes = [chunk_classes[position] for position in kept] if chunk_classes is not None else None
                if not chunk:
                    continue
            footprints = [None if array is not None else self.footprint(size) for size, array in zip(sizes, arrays)]
            timings: dict[str, float] = {"setup_s": setup}
            setup = 0.0
            t1 = time.perf_counter()
            if fused or picked:  # the clean rows ride in the noisy runs: all the time is "noisy passes"
                accumulators = {name: cam.new_accumulator(len(inputs)) for name, cam in noisy_cams.items()}
                t2 = t1
                if fused:
                    clean = passes.fused_passes(session, inputs, chunk_classes, accumulators, samples,
                                                noise_level, seed, batch, need_gradient,
                                                input_front=in_graph_kind == NOISY_INPUT)
                else:
                    clean = passes.picked_passes(session, inputs, chunk_classes, accumulators, samples,
                                                 noise_level, seed, batch, need_gradient)
            else:
                clean = (passes.clean_pass_in_graph(session, inputs, chunk_classes, batch, need_gradient)
                         if in_graph else
                         passes.clean_pass(gm, session, inputs, chunk_classes, k, neurons, batch, split_clean,
                                           need_gradient, regions=regions))
                t2 = time.perf_counter()
                accumulators = {name: cam.new_accumulator(len(clean.pair_image))
                                for name, cam in noisy_cams.items()}
                if accumulators:
                    passes.noisy_passes(session, inputs, clean, accumulators, samples, noise_level, seed,
                                        batch, in_graph=self._noise_in_graph(session))
            t3 = time.perf_counter()
            if not neuron_mode:  # -inf is allowed: a model may mask classes out with it
                _check_finite(clean.logits, chunk, "the model's logits hold NaN or +inf, so there is no class "
                              "score to explain: the model overflows on this input; check the model and its "
                              "preprocessing (--preprocess, --mean/--std)", allow_minus_inf=True)
            computed = {}
            moments_clean = None
            for name, cam in cams.items():
                if name in accumulators:  # the means in the sums' buffer, handed back after use
                    computed[name] = cam.compute(clean.activation, accumulators[name].finish())
                    accumulators[name].release()
                    continue
                # one sample per image: d1 = g, d2 = g^2, d3 = g^3 of the clean pass
                moments = moments_clean = moments_clean or GradientMoments.from_gradients(clean.gradient)
                computed[name] = cam.compute(clean.activation, moments)
            for name, result in computed.items():
                _check_finite(result.maps, [chunk[row] for row in clean.pair_image.tolist()],
                              f"the {name} map at layer {gm.layer} is not finite (NaN or inf): the layer's "
                              "activations or gradients overflow; pick another layer (--layer) or check the "
                              "model in float32")
            t4 = time.perf_counter()
            timings.update(preprocess_s=preprocess_s, clean_pass_s=t2 - t1, noisy_passes_s=t3 - t2,
                           cam_s=t4 - t3, images=len(chunk))
            facts = self._target_facts(clean)
            scores_output = {"scores_output": scores_output_name(gm.model)} if gm.is_class_score else {}
            per_image: dict[int, dict[str, list[Explanation]]] = {row: {} for row in range(len(chunk))}
            for name, cam in cams.items():
                result = computed[name]
                options = dict(cam.options, feature_maps=list(cam.feature_maps) if cam.feature_maps else None)
                if cam.needs_noise:
                    options.update(samples=samples, noise_level=noise_level, seed=seed)
                for pair, row in enumerate(clean.pair_image.tolist()):
                    item = chunk[row]
                    cls = clean.pair_class[pair]
                    score, probability, region, fraction = facts[pair]
                    explanation = Explanation(
                        raw_map=result.maps[pair], method=name, options=dict(options), layer=gm.layer,
                        class_index=cls, label=None if cls is None else self.label_of(cls),
                        score=score, probability=probability, region=region,
                        flat=bool(result.flat[pair]), image_index=item.index, image_size=sizes[row],
                        footprint=footprints[row],
                        source=item.path, model=self.model_name,
                        score_tensor=None if gm.is_class_score else gm.score, neuron=neurons,
                        device=session.device or "cpu", batch_size=batch,
                        noisy_passes_skipped=bool(skip_noise[name]), timings=dict(timings),
                        extra={"preprocessing": self.preprocessing_info(preprocessor),
                               **scores_output,
                               "labels": self.labels_source,
                               "target": ("neuron" if neuron_mode else
                                          "given" if chunk_classes is not None else f"top-{k} predicted"),
                               **({} if fraction is None else {"region_fraction": round(fraction, 6)})},
                        _image=pictures[row], _array=arrays[row])
                    per_image[row].setdefault(name, []).append(explanation)
            for row in range(len(chunk)):
                yield chunk[row].index, per_image[row]

    def preprocess(self, images) -> np.ndarray:
        """The batch the model is fed for ``images`` (paths, PIL images or an array)."""
        items = self._images.items(images)
        return self._images.load(items, self._preprocessor_for(items), self.session_dtype).inputs

    def preprocessing_info(self, preprocessor: Preprocessor | None = None) -> dict[str, Any]:
        """What the images are turned into: preset, mean, std, layout, size, where it came from."""
        p = preprocessor or self._preprocessor
        info = {"preset": self._preset_name, "layout": self.layout, "channels": self.channels,
                "source": self.preprocessing_source,
                "size": list(p.size) if p is not None else [self.model_size[0], self.model_size[1]],
                "resize": self.resize, "interpolation": self.interpolation}
        if self.crop_fraction is not None:
            info["crop_fraction"] = self.crop_fraction
        if p is not None:
            info.update(mean=[round(float(v), 6) for v in p.mean], std=[round(float(v), 6) for v in p.std])
        return info

    # -- set-up ------------------------------------------------------------------------------
    def _key(self, layer, score) -> tuple:
        if layer is None and score is None:
            return self._default_key
        return (layer if layer is not None else self._default_key[0],
                score if score is not None else self._default_key[1])

    def _gradient_model(self, layer, score) -> GradientModel:
        key = (layer, score)
        if key not in self._models:
            start = time.perf_counter()
            gm, cached = load_gradient_model(self.model_source, layer=layer, score=score,
                                             use_cache=self.use_cache)
            if len(gm.activation_shape) != 4:
                raise LayerError(
                    f"layer '{gm.layer}' has shape {list(gm.activation_shape)}, not a map: a CAM needs a 4-D "
                    "activation (channels first or last) or ViT tokens whose patches tile the image; "
                    "'onnxcam inspect MODEL' lists the layers that qualify")
            self.setup_timings["rewrite_s"] = time.perf_counter() - start
            self.setup_timings["from_cache"] = cached
            self._unreported_setup[gm.layer] = self.setup_timings["rewrite_s"]  # goes into the first results
            self._models[key] = gm
        return self._models[key]

    def _session(self, gm: GradientModel) -> GradientSession:
        key = (gm.layer, gm.score)
        if key not in self._sessions:
            self._sessions[key] = GradientSession(gm, device=self.requested_device, threads=self.threads)
        return self._sessions[key]

    def footprint(self, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """(top, left, height, width): the rectangle of an image of ``image_size`` (H, W) that the
        model sees, in the image's pixels; None when it sees the whole image, stretched."""
        if self._preprocessor is None:
            return None
        fit = self._preprocessor.fit(image_size)
        return None if fit.is_whole_image else fit.footprint

    def _setup_preprocessing(self, gm, preprocess, mean, std, size, resize=None, crop_fraction=None,
                             interpolation=None) -> None:
        self.layout, model_size, self.channels = detect_layout(gm.input_shape, name=f"model input '{gm.input_name}'")
        self._images = ImageReader(gm.input_shape, self.layout)
        self.model_size = model_size
        self._size = None
        if size is not None:
            parsed = check_size(size)
            if all(d is not None for d in model_size) and tuple(model_size) != parsed:
                raise OptionError(f"the model's input size is fixed at {model_size[0]}x{model_size[1]}: "
                                  "size only applies to models with a dynamic input size")
            self._size = parsed
        elif all(d is not None for d in model_size):
            self._size = (int(model_size[0]), int(model_size[1]))
        meta_mean = _metadata_floats(gm.model, "onnxcam.mean")
        meta_std = _metadata_floats(gm.model, "onnxcam.std")
        meta_preset = metadata_value(gm.model, "onnxcam.preprocess")
        user_values = mean is not None or std is not None
        if preprocess is not None:
            self._preset_name, source = get_preset(preprocess).name, "options"
        elif meta_preset is not None:
            self._preset_name, source = get_preset(meta_preset).name, "model metadata onnxcam.preprocess"
        elif meta_mean is not None or meta_std is not None:
            # metadata mean/std are on [0,1]-scaled RGB: the imagenet preset's scale and order
            self._preset_name, source = "imagenet", "model metadata onnxcam.mean/std"
            mean = meta_mean if mean is None else mean
            std = meta_std if std is None else std
        elif self.sidecar is not None and self.sidecar.describes_preprocessing:
            self._preset_name, source = "imagenet", self.sidecar.source  # 0-1 units, RGB
            mean = (self.sidecar.mean or (0.0,)) if mean is None else mean
            std = (self.sidecar.std or (1.0,)) if std is None else std
        elif (scaling := input_scaling(gm.model)) is not None:
            self._preset_name, source = scaling.preset, scaling.describe()
        else:
            self._preset_name, source = "imagenet", "default preset (no preprocessing in the metadata)"
        if user_values:
            source = f"{source}, mean/std from options"
        self.preprocessing_source = source
        self._mean, self._std = mean, std
        self.resize, self.crop_fraction = self._fitting(gm, resize, crop_fraction)
        if interpolation is None:
            interpolation = metadata_value(gm.model, "onnxcam.interpolation")
            if interpolation is None and self.sidecar is not None:
                interpolation = self.sidecar.interpolation
            try:
                self.interpolation = check_interpolation(interpolation)
            except OptionError as exc:
                raise ModelError(f"the model's metadata onnxcam.interpolation: {exc}; fix the metadata, or pass "
                                 "--interpolation") from None
        else:
            self.interpolation = check_interpolation(interpolation)
        # a crop the files next to the model describe sits where their library puts it
        centring = self.sidecar.centring if self.sidecar is not None and self.resize == self.sidecar.resize \
            and self.crop_fraction == self.sidecar.crop_fraction_at(self._size) else "round"
        self._preprocessor = None
        if self._size is not None:
            self._preprocessor = Preprocessor(self._size, preset=self._preset_name, mean=mean, std=std,
                                              layout=self.layout, channels=self.channels,
                                              resize=self.resize, crop_fraction=self.crop_fraction,
                                              interpolation=self.interpolation, centring=centring)

    def _fitting(self, gm, resize, crop_fraction) -> tuple[str, float | None]:
        """(resize mode, crop fraction): the options', else the model metadata's, else the files
        next to the model's, else stretch. A mode given alone takes the crop fraction that the
        metadata or the files give for that same mode."""
        described = []  # (mode, fraction), the metadata's first
        meta_mode = metadata_value(gm.model, "onnxcam.resize")
        meta_fraction = _metadata_floats(gm.model, "onnxcam.crop_fraction")
        if meta_mode is not None or meta_fraction is not None:
            described.append((meta_mode, None if meta_fraction is None else meta_fraction[0]))
        if self.sidecar is not None and self.sidecar.resize is not None:
            described.append((self.sidecar.resize, self.sidecar.crop_fraction_at(self._size)))
        if resize is None and crop_fraction is None:
            try:
                return check_resize(*described[0]) if described else check_resize(None)
            except OptionError as exc:  # the files' own values are checked as they are read
                raise ModelError(f"the model's metadata onnxcam.resize/onnxcam.crop_fraction: {exc}; fix the "
                                 "metadata, or pass --resize") from None
        if crop_fraction is None and resize is not None:
            same = [fraction for mode, fraction in described
                    if fraction is not None and str(mode).strip().lower() == str(resize).strip().lower()]
            crop_fraction = same[0] if same else None
        return check_resize(resize, crop_fraction)

    def _preprocessor_for(self, items: list[Item]) -> Preprocessor | None:
        if self._preprocessor is None and any(item.array is None for item in items):
            raise OptionError(f"the model's input size is dynamic ({list(self.input_shape)}): give the "
                              "image size to feed, size=(H, W) (--size H,W)")
        return self._preprocessor

    def _batch_for(self, gm: GradientModel) -> int:
        if gm.batch_built_in is not None:  # one row per run: a larger batch would not run
            if self._batch_option not in (None, 1):
                raise OptionError(f"batch size {self._batch_option}: the model runs one image at a time "
                                  f"(a batch of 1 is built in at node {gm.batch_built_in!r}); use batch size 1 "
                                  "(--batch-size 1) or re-export the model with a dynamic batch")
            return 1
        if self._batch_option is not None:
            return self._batch_option
        per_sample = 4 * (_elements(self._item_shape(gm)) + gm.widest_step
                          + 2 * _elements(gm.activation_shape[1:], default=_elements(self._item_shape(gm)))
                          + 2 * _pixel_scores(gm))
        cap, memory = ((CUDA_MAX_BATCH, CUDA_BATCH_MEMORY) if self._session(gm).planned_device == "cuda"
                       else (MAX_BATCH, BATCH_MEMORY))
        return int(max(1, min(cap, memory // max(per_sample, 1))))

    def _group_for(self, gm: GradientModel, batch: int) -> int:
        image = _elements(self._item_shape(gm))
        activation = _elements(gm.activation_shape[1:], default=image)
        per_image = 4 * image + 8 * activation + 24 * activation + 16 * activation + 8 * _pixel_scores(gm)
        batches = max(1, min(MAX_GROUP_BATCHES, GROUP_MEMORY // max(batch * per_image, 1)))
        return batch * int(batches)

    def _item_shape(self, gm: GradientModel) -> tuple:
        return tuple(gm.input_shape[1:])

    def _methods(self, methods, feature_maps, method_options) -> dict[str, CamMethod]:
        if isinstance(methods, str):
            methods = (methods,)
        cams: dict[str, CamMethod] = {}
        for method in methods:
            key = _method_key(method)
            if key not in cams:
                cams[key] = get_method(key, feature_maps=feature_maps, **method_options.get(key, {}))
        unknown = set(method_options) - set(cams)
        if unknown:
            raise OptionError(f"options were given for {sorted(unknown)[0]}, which is not among the methods run")
        if not cams:
            raise OptionError("no method given: choose one of gradcam, gradcampp, smoothgradcampp, "
                              "xgradcam, layercam, hirescam")
        return cams

    @property
    def session_dtype(self) -> np.dtype:
        return self._session(self.gradient_model).input_dtype

    def _target_facts(self, clean: passes.CleanPass) -> list[tuple]:
        """Per (image, target) pair of ``clean``: (score, probability, region, region's share of
        the pixels). A class's logit and probability; a segmentation class's logits summed over
        its region, their mean probability there, the region and its share; Nones for a neuron."""
        if clean.regions is None:
            scores, probabilities = clean.logits, self._probabilities(clean.logits)
        else:
            scores, probabilities, fractions, owned = clean.regions.summary()
        facts = []
        for row, cls in zip(clean.pair_image.tolist(), clean.pair_class):
            if cls is None:
                facts.append((None, None, None, None))
            else:
                region, fraction = ((None, None) if clean.regions is None
                                    else (owned[row, cls], float(fractions[row, cls])))
                facts.append((float(scores[row, cls]), float(probabilities[row, cls]), region, fraction))
        return facts

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        values = np.asarray(logits, dtype=np.float64)
        if self._squash == "sigmoid":
            return 1.0 / (1.0 + np.exp(-values))
        shifted = values - values.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    def _noise_in_graph(self, session: GradientSession, fused: bool = False) -> bool:
        """The option, or automatically: with a float32 input, on CUDA, and on the CPU where the
        graph sums the moments (``fused``: Smooth Grad-CAM++ averaging moments, one class per
        image; there NumPy still makes the noisy batch, ``_fused_kind``). On 2 CPU cores the
        float64 host sums of every row's gradient and NumPy's noise made beside the runs cost
        5-10% of the floor more. (Several classes per image on a cut model keep the NumPy noise:
        one forward per sample, the head per class.)"""
        if self.noise_in_graph is not None:
            return self.noise_in_graph
        return session.input_dtype == np.float32 and (fused or session.planned_device == "cuda")

    @staticmethod
    def _fused_kind(session: GradientSession) -> str:
        """The noisy model the fused runs use: on CUDA the bank front (the noisy batch made on
        the device), elsewhere the input front (NumPy makes it: a model input made inside the
        graph slowed ONNX Runtime's in-place residual convolutions on the CPU)."""
        return NOISY if session.planned_device == "cuda" else NOISY_INPUT

    def _one_class_picked(self, session: GradientSession, class_lists, k: int, neuron_mode: bool) -> bool:
        """Whether each image explains one class, given or its top prediction, which the graph
        can pick itself. Then with the noise in the graph (the CUDA path) every run goes through
        the noisy model: the clean pass is a noisy run with scale 0 (``passes.clean_pass_in_graph``),
        and with moment-averaged noisy methods it shares the noisy runs (``passes.fused_passes``);
        with NumPy's noise and noisy methods, the clean pass shares the noisy runs of the picking
        model (``passes.picked_passes``)."""
        one_class = (class_lists is None and k == 1) or (class_lists is not None
                                                          and all(len(c) == 1 for c in class_lists))
        return one_class and not neuron_mode and noisy.targets_in_graph(session.gradient_model)


# -- helpers -------------------------------------------------------------------------------------
def _check_finite(values: np.ndarray, items: list[Item], problem: str, allow_minus_inf: bool = False) -> None:
    """ModelError naming the first image whose row of ``values`` holds a NaN or an infinity:
    an overflowing model would otherwise give a class picked from NaN logits, or a NaN map."""
    if values.size == 0:
        return
    rows = values.reshape(len(values), -1)
    finite = (~(np.isnan(rows) | np.isposinf(rows)) if allow_minus_inf else np.isfinite(rows)).all(axis=1)
    if not finite.all():
        item = items[int(np.argmin(finite))]
        raise ModelError(f"{item.where()}: {problem}")


def _pixel_scores(gm: GradientModel) -> int:
    """A segmentation model's scores per image (classes x H x W: each run's logits and seed rows
    are that large, 23 MB for DeepLab's 21 classes at 520 x 520), else 0."""
    return _elements(gm.seed_shape[1:], default=0) if gm.class_grid is not None else 0


def _method_key(name: str) -> str:
    from onnxcam.cams import canonical_method_name

    return canonical_method_name(name)


def _check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch size {batch_size!r} must be a whole number >= 1")
    return int(batch_size)


def _elements(shape, default: int = 1) -> int:
    dims = list(shape)
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        return default
    return int(math.prod(dims))


def _metadata_floats(model: onnx.ModelProto, key: str) -> list[float] | None:
    value = metadata_value(model, key)
    if value is None:
        return None
    try:
        numbers = [float(part) for part in value.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ModelError(f"the model's metadata {key}={value!r} is not comma-separated numbers: fix "
                         "the metadata, or pass --mean/--std") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise ModelError(f"the model's metadata {key}={value!r} is not comma-separated numbers")
    return numbers


def _squashing(model: onnx.ModelProto) -> str:
    """"sigmoid" when the model's score output is a Sigmoid of its logits, else "softmax"."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = scores_output_name(model)
    passes = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"}
    for _ in range(64):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type == "Sigmoid":
            return "sigmoid"
        if node.op_type not in passes:
            break
        name = node.input[0]
    return "softmax"
