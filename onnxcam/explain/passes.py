"""The passes of an explanation: runs of a GradientSession that give the clean A, g and logits
(``clean_pass``) and feed the noisy samples' gradients to the moment accumulators
(``noisy_passes``); both at once, with the class picked in the graph (``picked_passes``, NumPy's
noise and per-row gradients); and the forms that go through the noisy model
(``onnxcam.graph.noisy``): ``fused_passes`` (Smooth Grad-CAM++'s usual form, on the CPU and on
CUDA: the moments summed in the graph), and on CUDA ``clean_pass_in_graph`` and
``noisy_passes_in_graph``.

``onnxcam.explain.explainer`` decides which passes run (options, device, classes); this module
only runs them. Each pass returns or feeds the same quantities whichever form it takes, so the
maps agree across forms (tests/test_explainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcam.explain import targets as tg
from onnxcam.explain.noise import (BANK, NOISE_BANK_MEMORY, chunk_bounds, fill_noisy, noise_sigma, noisy_batches,
                                  standard_normal_stack)
from onnxcam.explain.regions import PixelClasses, PixelReadout
from onnxcam.graph import noisy
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, GradientModel
from onnxcam.runtime.prefetch import prefetched
from onnxcam.runtime.session import FORWARD, FULL, HEAD, GradientSession


@dataclass
class CleanPass:
    """Per (image, target) pair of a group: the image row, the class (or None for neurons), A, g."""

    pair_image: np.ndarray      # (R,) row in the group
    pair_class: list[int | None]
    seeds: np.ndarray           # (R, ...) seed rows
    activation: np.ndarray      # (R, K, h, w)
    gradient: np.ndarray | None  # (R, K, h, w); None when no method needs the clean gradient
    logits: np.ndarray          # (G, classes)
    regions: PixelReadout | None = None  # a segmentation model's logits, read once


def plan_sessions(session: GradientSession, class_lists, k, neuron_mode, count, batch,
                  noisy_needed, regions: bool = False) -> tuple[tuple[str, ...], bool]:
    """The sessions the passes will use (created before the passes are timed), and whether
    the clean pass uses the cut model (forward part + head).

    The cut model serves seeds that are only known after the forward pass (predicted classes)
    and several classes per image. Exception: when the noisy passes need the whole model
    anyway and all images fit in one batch, two runs of the whole model (zero seed for the
    logits, then the seeds) are cheaper than creating two more sessions. A segmentation model's
    seeds need its logits: its clean pass is cut wherever the model can be
    (``region_clean_pass``).
    """
    one_each = neuron_mode or (class_lists is not None and all(len(c) == 1 for c in class_lists))
    multi = not one_each and (class_lists is not None or k > 1)
    noisy_kinds = ([FORWARD, HEAD] if (multi and session.has_split) else [FULL]) if noisy_needed else []
    split_clean = session.has_split and (regions or (not one_each and not (noisy_kinds == [FULL] and count <= batch)))
    kinds = ([FORWARD, HEAD] if split_clean else [FULL]) + noisy_kinds
    return tuple(dict.fromkeys(kinds)), split_clean


def clean_pass(gm: GradientModel, session: GradientSession, inputs: np.ndarray,
               class_lists, k: int, neurons, batch: int, split: bool,
               need_gradient: bool = True, regions: PixelClasses | None = None) -> CleanPass:
    """A, g and the logits of the clean images (g is None when ``need_gradient`` is False
    and the classes are predicted: then the runs that would only give g are skipped)."""
    count = len(inputs)
    if regions is not None:
        return region_clean_pass(session, inputs, class_lists, k, batch, regions, split, need_gradient)
    if neurons is not None:
        row = tg.neuron_seed(neurons, gm.seed_shape)
        seeds = np.broadcast_to(row, (count, *row.shape))
        activation, gradient, logits = full_runs(session, inputs, seeds, batch)
        return CleanPass(np.arange(count), [None] * count, seeds, activation, gradient, logits)
    classes = gm.num_classes
    if class_lists is not None and all(len(c) == 1 for c in class_lists):
        chosen = [c[0] for c in class_lists]
        seeds = tg.one_hot(chosen, classes)
        activation, gradient, logits = full_runs(session, inputs, seeds, batch)
        return CleanPass(np.arange(count), chosen, seeds, activation, gradient, logits)
    if split:
        activation, logits = chunked(lambda s: session.forward(inputs[s]), count, batch)
        lists = class_lists if class_lists is not None else tg.top_classes(logits, k)
        pair_image = np.array([row for row, cs in enumerate(lists) for _ in cs])
        pair_class = [c for cs in lists for c in cs]
        seeds = tg.one_hot(pair_class, classes)
        one_each = len(pair_image) == count and bool((pair_image == np.arange(count)).all())
        pair_activation = activation if one_each else activation[pair_image]  # no copy for top-1
        gradient = None
        if need_gradient:
            (gradient,) = chunked(lambda s: (session.head(pair_activation[s], seeds[s]),),
                                   len(pair_image), batch)
        return CleanPass(pair_image, pair_class, seeds, pair_activation, gradient, logits)
    # whole model twice (the layer does not cut the model, or it is cheaper): a zero seed
    # gives the logits, then the real seeds
    if class_lists is None:
        zero = np.zeros((count, classes), dtype=np.float32)
        zero_activation, _, logits = full_runs(session, inputs, zero, batch)
        lists = tg.top_classes(logits, k)
    else:
        lists, logits = class_lists, None
    pair_image = np.array([row for row, cs in enumerate(lists) for _ in cs])
    pair_class = [c for cs in lists for c in cs]
    seeds = tg.one_hot(pair_class, classes)
    if logits is not None and not need_gradient:  # the zero-seed run gave A and the logits
        return CleanPass(pair_image, pair_class, seeds, zero_activation[pair_image], None, logits)
    activation, gradient, pair_logits = full_runs(session, inputs[pair_image], seeds, batch)
    if logits is None:
        first = np.array([pair_image.tolist().index(row) for row in range(count)])
        logits = pair_logits[first]
    return CleanPass(pair_image, pair_class, seeds, activation, gradient, logits)


def region_clean_pass(session: GradientSession, inputs: np.ndarray, class_lists, k: int, batch: int,
                      regions: PixelClasses, split: bool, need_gradient: bool = True) -> CleanPass:
    """The clean pass of a segmentation model: the forward pass gives A and the logits, and with
    them the classes' regions (``regions``), whose seeds the head then differentiates (``split``;
    else a zero-seed run of the whole model, then one with the seeds). A whole run costs the
    backward even with a zero seed, and the backward from a layer early in the network (LRASPP's
    automatic layer, before its two branches) costs more than the forward."""
    count = len(inputs)
    if split:
        activation, logits = chunked(lambda s: session.forward(inputs[s]), count, batch)
    else:
        zero = np.zeros((count, int(np.prod(session.gradient_model.seed_shape[1:]))), dtype=np.float32)
        activation, _, logits = full_runs(session, inputs, zero, batch)
    readout = regions.read(logits)
    lists = class_lists if class_lists is not None else readout.top_classes(k)
    pair_image = np.array([row for row, cs in enumerate(lists) for _ in cs])
    pair_class = [c for cs in lists for c in cs]
    seeds = readout.seeds(pair_image, pair_class)
    pair_activation = activation[pair_image]
    gradient = None
    if need_gradient and split:
        (gradient,) = chunked(lambda s: (session.head(pair_activation[s], seeds[s]),), len(pair_image), batch)
    elif need_gradient:
        pair_activation, gradient, _ = full_runs(session, inputs[pair_image], seeds, batch)
    return CleanPass(pair_image, pair_class, seeds, pair_activation, gradient, logits, readout)


def noisy_passes(session: GradientSession, inputs: np.ndarray, clean: CleanPass,
                 accumulators: dict, samples: int, noise_level: float, seed: int,
                 batch: int, in_graph: bool = False) -> None:
    """Feed every accumulator the gradients of ``samples`` noisy copies of every pair's image
    (``in_graph``: the noisy batches made in the noisy model, ``noisy_passes_in_graph``)."""
    pair_image = clean.pair_image
    one_each = len(pair_image) == len(inputs) and np.array_equal(pair_image, np.arange(len(inputs)))
    if one_each or not session.has_split:
        # units = (pair, sample); pairs of the same image get the same noise (same generator)
        pair_inputs = inputs if one_each else inputs[pair_image]
        if in_graph:
            noisy_passes_in_graph(session, pair_inputs, clean, accumulators, samples, noise_level, seed, batch)
            return
        for chunk in prefetched(noisy_batches(pair_inputs, samples, noise_level, seed, batch)):
            activation, gradient, _ = session.run(chunk.inputs, clean.seeds[chunk.rows])
            feed(accumulators, chunk.rows, gradient, activation)
        return
    # several classes per image and a cut model: one forward per noisy sample, the head per class
    pairs_of = [np.flatnonzero(pair_image == row) for row in range(len(inputs))]
    for chunk in prefetched(noisy_batches(inputs, samples, noise_level, seed, batch)):
        activation, _ = session.forward(chunk.inputs)
        unit = np.concatenate([np.full(len(pairs_of[row]), i) for i, row in enumerate(chunk.rows)])
        pairs = np.concatenate([pairs_of[row] for row in chunk.rows])
        for start in range(0, len(pairs), batch):
            part = slice(start, start + batch)
            unit_activation = activation[unit[part]]
            gradient = session.head(unit_activation, clean.seeds[pairs[part]])
            feed(accumulators, pairs[part], gradient, unit_activation)


def clean_pass_in_graph(session: GradientSession, inputs: np.ndarray, chunk_classes, batch: int,
                        need_gradient: bool) -> CleanPass:
    """The clean pass as runs of the noisy model with scale 0: each row explains its given
    class or its own top prediction (``picks`` = its own position), all on the device."""
    count = len(inputs)
    session.bind_noise(inputs)
    targets = np.array([c[0] for c in chunk_classes] if chunk_classes is not None else [-1] * count)
    outputs = (ACTIVATION, LOGITS, noisy.CLASSES) + ((GRADIENT,) if need_gradient else ())
    parts = []
    bounds = chunk_bounds(count, batch)
    run_rows = longest_run(bounds)
    for start, stop in bounds:
        rows = np.arange(start, stop)
        zeros = np.zeros(len(rows))
        parts.append(session.run_noisy(noisy.row_feeds(rows, zeros, zeros, zeros, targets=targets[rows],
                                                        picks=np.arange(len(rows))), outputs, pad_to=run_rows))
    activation, logits, classes = (joined(parts, i) for i in range(3))
    gradient = joined(parts, 3) if need_gradient else None
    chosen = [int(c) for c in classes]
    return CleanPass(np.arange(count), chosen, tg.one_hot(chosen, session.gradient_model.num_classes),
                     activation, gradient, logits)


def longest_run(bounds: list[tuple[int, int]]) -> int:
    """The rows of the longest of a pass's runs (``chunk_bounds``: the others have one less)."""
    return max((stop - start for start, stop in bounds), default=0)


def joined(parts: list[list[np.ndarray]], index: int) -> np.ndarray:
    """Output ``index`` of every run, in one array (the run's own array when there was one run:
    a copy of 25 ResNet-50 activations and gradients cost 3 ms, half a GPU forward pass)."""
    return parts[0][index] if len(parts) == 1 else np.concatenate([part[index] for part in parts])


def fused_passes(session: GradientSession, inputs: np.ndarray, chunk_classes, accumulators: dict,
                 samples: int, noise_level: float, seed: int, batch: int, need_gradient: bool,
                 input_front: bool = False) -> CleanPass:
    """The clean pass and the noisy passes of each image in runs of the noisy model.

    An image's n + 1 rows (its clean row, scale 0 and weight 0, then its noisy rows) are cut
    into runs of near-equal size (``chunk_bounds``), and the clean row's predicted class (or
    the given one) is the target of every row, chosen in the graph. Each run returns only the
    sums of g, g^2, g^3 over its noisy rows, and the first run the clean row's A, logits, class
    (and g when a method without noise needs it): one run per image for n < batch, and no batch
    of gradients on the bus.

    The bank of standard normal samples stays bound between calls when it fits
    ``NOISE_BANK_MEMORY``; a larger one is bound a run's samples at a time, so memory stays
    bounded by the batch. With ``input_front`` (the CPU) NumPy makes each run's noisy batch
    before the run, in a buffer kept for the call (``fill_noisy``), straight from the arrays of
    the process's noise bank (``NoiseBank.standard_normals``: no stacked copy, which cost a
    15 MiB copy whenever another seed had come in between): the model's input then comes from
    outside the graph (``noisy.build_noisy_model``).
    """
    shape = tuple(inputs.shape[1:])
    whole_bank = samples * int(np.prod(shape)) * 4 <= NOISE_BANK_MEMORY
    if input_front:
        batch_inputs = np.empty((min(batch, samples + 1), *shape), dtype=np.float32)
    elif whole_bank:
        session.bind_noise(inputs, (seed, 0, samples, shape), lambda: standard_normal_stack(seed, samples, shape))
    first_outputs = (*noisy.SUMS, noisy.FIRST_ACTIVATION, noisy.FIRST_LOGITS, noisy.CLASSES)
    first_outputs += (noisy.FIRST_GRADIENT,) if need_gradient else ()
    activation, gradient, logits, classes = [], [], [], []
    bounds = chunk_bounds(samples + 1, batch)  # every image's rows: the clean one, then n noisy
    run_rows = longest_run(bounds)
    for image in range(len(inputs)):
        sigma = noise_sigma(inputs[image], noise_level)
        target = chunk_classes[image][0] if chunk_classes is not None else -1
        for start, stop in bounds:
            clean_row = start == 0
            weights = (np.arange(start, stop) > 0).astype(np.float64)  # 0 for the clean row
            targets = np.full(stop - start, target)
            if input_front:
                noise = [None] * int(clean_row) + BANK.standard_normals(seed, range(max(start - 1, 0), stop - 1),
                                                                        shape, np.float32)
                rows = fill_noisy(batch_inputs[:stop - start], inputs[image], noise, sigma)
                feeds = noisy.row_feeds(None, None, None, weights, targets=targets)
                feeds[session.gradient_model.input_name] = rows
            else:
                ids = np.maximum(np.arange(start, stop) - 1, 0)  # the clean row (scale 0) reads sample 0
                if not whole_bank:  # this run's samples only
                    first = int(ids[0])
                    session.bind_noise(inputs if image == 0 and clean_row else None,
                                       (seed, first, int(ids[-1]) + 1 - first, shape),
                                       lambda: standard_normal_stack(seed, int(ids[-1]) + 1 - first, shape,
                                                                     first=first))
                    ids = ids - first
                feeds = noisy.row_feeds(np.full(stop - start, image), ids, weights * sigma, weights, targets=targets)
            fetched = session.run_noisy(feeds, first_outputs if clean_row else noisy.SUMS,
                                        front="input" if input_front else "bank", pad_to=run_rows)
            if clean_row:
                activation.append(fetched[3])
                logits.append(fetched[4])
                target = int(fetched[5][0])
                classes.append(target)
                if need_gradient:
                    gradient.append(fetched[6])
            count = int(weights.sum())
            if count:
                for accumulator in accumulators.values():
                    accumulator.add_sums(image, count, *fetched[:3])
    num_classes = session.gradient_model.num_classes
    return CleanPass(np.arange(len(inputs)), classes, tg.one_hot(classes, num_classes),
                     np.concatenate(activation), np.concatenate(gradient) if need_gradient else None,
                     np.concatenate(logits))


def picked_passes(session: GradientSession, inputs: np.ndarray, chunk_classes, accumulators: dict,
                  samples: int, noise_level: float, seed: int, batch: int, need_gradient: bool) -> CleanPass:
    """The clean pass and the noisy passes in one series of runs of the picking model, with
    the noisy batches made by NumPy (the CPU form of ``fused_passes``).

    Each image's clean row comes just before its noisy rows (``noisy_batches(clean_rows=True)``),
    so it rides in a noisy batch: its noisy rows in the same run explain the class the graph
    picks from its logits (or the given one), later runs the class that run returned. No
    separate clean run, no batch of one at the end, and the next batch is made while this one
    runs. The gradients come back per row, and the accumulators sum them one after another, as
    ``noisy_passes`` does: the same maps, bit for bit, for any batch size."""
    count = len(inputs)
    classes = np.array([c[0] for c in chunk_classes] if chunk_classes is not None else [-1] * count,
                       dtype=np.int64)  # -1: predicted, known once the image's clean row has run
    keep_maps = any(accumulator.keep_maps for accumulator in accumulators.values())
    activation, gradient, logits = [None] * count, [None] * count, [None] * count
    for chunk in prefetched(noisy_batches(inputs, samples, noise_level, seed, batch, clean_rows=True)):
        clean = chunk.sample < 0
        own_clean = {row: i for i, row in enumerate(chunk.rows.tolist()) if clean[i]}
        picks = np.array([own_clean.get(row, 0) for row in chunk.rows.tolist()])
        outputs = (GRADIENT, noisy.CLASSES) + ((ACTIVATION, LOGITS) if clean.any() or keep_maps else ())
        fetched = dict(zip(outputs, session.run_picking(chunk.inputs, classes[chunk.rows], picks, outputs)))
        for i in np.flatnonzero(clean):
            row = int(chunk.rows[i])
            classes[row] = fetched[noisy.CLASSES][i]
            activation[row], logits[row] = fetched[ACTIVATION][i], fetched[LOGITS][i]
            gradient[row] = fetched[GRADIENT][i] if need_gradient else None
        sampled = ~clean
        if sampled.any():
            feed(accumulators, chunk.rows[sampled], fetched[GRADIENT][sampled],
                 fetched[ACTIVATION][sampled] if keep_maps else None)
    chosen = [int(c) for c in classes]
    return CleanPass(np.arange(count), chosen, tg.one_hot(chosen, session.gradient_model.num_classes),
                     np.stack(activation), np.stack(gradient) if need_gradient else None, np.stack(logits))


def noisy_passes_in_graph(session: GradientSession, inputs: np.ndarray, clean: CleanPass,
                          accumulators: dict, samples: int, noise_level: float, seed: int,
                          batch: int) -> None:
    """The noisy passes with the noisy batch made in the graph (``GradientSession.run_noisy``):
    the same units, in the same order, as ``noisy_batches``."""
    shape = tuple(inputs.shape[1:])
    sigma = np.array([noise_sigma(image, noise_level) for image in inputs], dtype=np.float32)
    session.bind_noise(inputs, (seed, 0, samples, shape), lambda: standard_normal_stack(seed, samples, shape))
    keep_maps = any(getattr(a, "keep_maps", False) for a in accumulators.values())
    outputs = (GRADIENT, ACTIVATION) if keep_maps else (GRADIENT,)
    classes = noisy.targets_in_graph(session.gradient_model)
    total = len(inputs) * samples
    bounds = chunk_bounds(total, batch)
    run_rows = longest_run(bounds)
    for start, stop in bounds:
        units = np.arange(start, stop)
        rows, sample = units // samples, units % samples
        feeds = noisy.row_feeds(rows, sample, sigma[rows], np.ones(len(rows)),
                                targets=np.asarray(clean.pair_class)[rows] if classes else None,
                                seed=None if classes else clean.seeds[rows])
        fetched = session.run_noisy(feeds, outputs, pad_to=run_rows)
        feed(accumulators, rows, fetched[0], fetched[1] if keep_maps else None)


def feed(accumulators: dict, rows: np.ndarray, gradient: np.ndarray, activation: np.ndarray | None) -> None:
    """Add a batch's samples. The accumulators sum them one after another, so the maps do not
    depend on the batch size; the per-sample maps of the "maps" averaging are still made one
    sample at a time, so that their arithmetic cannot depend on the batch either."""
    for accumulator in accumulators.values():
        if not accumulator.keep_maps:
            accumulator.add(rows, gradient)
            continue
        for i in range(len(rows)):
            one = slice(i, i + 1)
            accumulator.add(rows[one], gradient[one], activation[one])


def full_runs(session: GradientSession, inputs: np.ndarray, seeds: np.ndarray, batch: int):
    return chunked(lambda s: session.run(inputs[s], seeds[s]), len(inputs), batch)


def chunked(run, count: int, batch: int) -> list[np.ndarray]:
    """Concatenate the outputs of ``run(slice)`` over chunks of at most ``batch``, of near-equal
    size (``chunk_bounds``)."""
    parts = [run(slice(start, stop)) for start, stop in chunk_bounds(count, batch)]
    return [np.concatenate([part[i] for part in parts]) if len(parts) > 1 else parts[0][i]
            for i in range(len(parts[0]))]
