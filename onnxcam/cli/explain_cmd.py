"""``onnxcam explain``: write a CAM overlay, raw map and JSON record per image and class."""

from __future__ import annotations

import os
import re
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import click

from onnxcam.cams import METHODS
from onnxcam.cli.common import (batch_size_option, comma_numbers, device_option, echo_json, echo_skipped,
                                input_option, preprocess_option, resize_options, scores_output_option, status_line,
                                stderr_is_tty)
from onnxcam.errors import ImageError, OptionError
from onnxcam.explain import COMPARE_METHODS, METHOD_TITLES, Explainer
from onnxcam.graph.fixed_inputs import parse_input_options
from onnxcam.explain.result import check_not_protected
from onnxcam.imaging import COLORMAPS, compare_grid, find_images
from onnxcam.imaging.io import IMAGE_FORMATS, display_path, save_options
from onnxcam.runtime.providers import describe, usable_cpus

VARIANT_OPTIONS = ("numerator", "averaging", "denominator")
#: Images whose files may still be being written while later images are explained, per writer.
WRITE_AHEAD = 2


def writer_threads() -> int:
    """Threads that write the files: half the usable CPUs, 2 to 8. Two kept up with the model on
    2 cores (64 images: 7.2 s -> 2.75 s); on a GPU the writing is the CPU's whole share of the work."""
    return max(2, min(8, usable_cpus() // 2))


@click.command("explain", short_help="Write CAM overlays, raw maps and JSON records for images.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--method", default="smoothgradcampp", show_default=True, metavar="METHOD",
              help="gradcam, gradcampp, smoothgradcampp, xgradcam, layercam or hirescam "
                   "(spellings such as Grad-CAM++ work too).")
@click.option("-l", "--layer", metavar="NAME",
              help="Target layer: a tensor or node name (default: the last layer every path to the "
                   "logits passes through; 'onnxcam inspect MODEL' lists them).")
@click.option("-c", "--class", "classes", multiple=True, metavar="INT|NAME",
              help="Class to explain, by index or by label (repeat for several); default: the "
                   "predicted class.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), metavar="K",
              help="Explain the K most probable classes of each image.  [default: 1]")
@click.option("--feature-maps", callback=comma_numbers(int, what="channel indices"), metavar="1,5,9",
              help="Sum only these channels of the layer (the paper's feature-map level).")
@click.option("--score", metavar="TENSOR",
              help="Neuron-level CAM: differentiate this tensor instead of the logits (with --neuron).")
@click.option("--neuron", multiple=True, callback=comma_numbers(int, what="indices"), metavar="c,i,j",
              help="Index of the neuron in --score TENSOR, batch dimension left out; repeat to sum several.")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=25, show_default=True,
              help="Noisy samples per image (Smooth Grad-CAM++).")
@click.option("--noise-level", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Noise sigma as a fraction of each image's value range (max - min).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the noise: the same seed gives the same map.")
@click.option("--numerator", type=click.Choice(["D2", "D1"], case_sensitive=False),
              help="Smooth Grad-CAM++ alpha numerator: D2 (default, as Grad-CAM++) or D1 (the paper as printed).")
@click.option("--averaging", type=click.Choice(["moments", "maps"], case_sensitive=False),
              help="Smooth Grad-CAM++: average the gradient moments (default) or whole noisy maps.")
@click.option("--denominator", type=click.Choice(["sum", "weighted"], case_sensitive=False),
              help="Grad-CAM++ alpha denominator: sum (default, eq. 19) or weighted (torchcam).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("onnxcam-out"),
              show_default=True, help="Output folder (created if needed).")
@device_option
@batch_size_option
@preprocess_option
@resize_options
@click.option("--mean", callback=comma_numbers(float, what="numbers"), metavar="a,b,c",
              help="Per-channel mean, in the preset's units (0-1 for imagenet/unit/symmetric).")
@click.option("--std", callback=comma_numbers(float, what="numbers"), metavar="a,b,c",
              help="Per-channel standard deviation, in the preset's units.")
@click.option("--size", callback=comma_numbers(int, 2, "numbers"), metavar="H,W",
              help="Input size to feed a model whose input size is dynamic.")
@input_option
@scores_output_option
@click.option("--labels", type=click.Path(path_type=Path), metavar="FILE",
              help="Class names: one per line, or a JSON list (default: model metadata, or ImageNet "
                   "for 1000 classes).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of the map in the overlay (0: image only, 1: map only).")
@click.option("--colormap", type=click.Choice(sorted(COLORMAPS), case_sensitive=False), default="turbo",
              show_default=True, help="Colours of the overlay.")
@click.option("--image-format", type=click.Choice(list(IMAGE_FORMATS), case_sensitive=False), default="png",
              show_default=True,
              help="File format of the overlays and the --compare figure: jpg writes large photos' "
                   "overlays about 20x faster into files 7x smaller (lossy; the raw maps stay in the .npy).")
@click.option("--compare", is_flag=True,
              help="Also write <stem>_compare.png: the image, Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of a summary.")
@click.option("--no-cache", is_flag=True, help="Rewrite the model now instead of using the disk cache.")
@click.option("--skip-unreadable", is_flag=True,
              help="Skip image files that cannot be read, instead of stopping at the first: they are "
                   "listed at the end and the exit status is 1.")
@click.pass_context
def explain(ctx, model, images, method, layer, classes, top_k, feature_maps, score, neuron, samples,
            noise_level, seed, numerator, averaging, denominator, out, device, batch_size, preprocess,
            resize, crop_fraction, interpolation, mean, std, size, fixed_inputs, scores_output, labels, alpha,
            colormap, image_format, compare, as_json, no_cache, skip_unreadable):
    """Explain IMAGE files (or every image in a folder DIR) with a gradient CAM.

    For every image and class it writes into --out, atomically:

    \b
      <stem>_<method>_c<class>.png   the map over the image
      <stem>_<method>_c<class>.npy   the raw map at the layer's resolution (float32)
      <stem>_<method>_c<class>.json  model, layer, method and options, class and label,
                                     score (logit) and probability, timings, device

    Neuron-level maps (--score/--neuron) use n<indices> instead of c<class>; --image-format jpg
    writes the map over the image as .jpg. Input files are never overwritten.

    \b
    Examples:
      onnxcam explain model.onnx cat.jpg
      onnxcam explain model.onnx cat.jpg --compare --out maps
      onnxcam explain model.onnx photos/ --method gradcampp --top-k 3
      onnxcam explain model.onnx cat.jpg --class 281 --class 285 --samples 50 --noise-level 0.2
      onnxcam explain model.onnx cat.jpg --layer /features/denseblock3/Concat --averaging maps
    """
    started = time.perf_counter()
    if classes and top_k is not None:
        raise click.UsageError("give either --class or --top-k, not both")
    if neuron and not score:
        raise click.UsageError("--neuron needs --score TENSOR (the tensor the neuron is in)")
    if score and not neuron:
        raise click.UsageError("--score needs --neuron c,i,j (which element of the tensor to explain)")
    if score and (classes or top_k is not None):
        raise click.UsageError("--score/--neuron explain a neuron, not a class: drop --class/--top-k")
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out '{out}' is a file: give a folder for the outputs")

    paths = _without_previous_outputs(find_images(images), images, out)
    protected = [model, *paths]
    check_not_protected([out], protected)
    stems = _unique_stems(paths)

    with status_line(f"Preparing {Path(model).name}",
                     show=stderr_is_tty() and not as_json):
        explainer = Explainer(model, layer=layer, device=device, score=score, batch_size=batch_size,
                              preprocess=preprocess, mean=mean, std=std, size=size, resize=resize,
                              crop_fraction=crop_fraction, interpolation=interpolation,
                              inputs=parse_input_options(fixed_inputs), scores_output=scores_output,
                              labels=labels, cache=not no_cache)
    main_method = _canonical(method)
    methods = [main_method] + [m for m in COMPARE_METHODS if compare and m != main_method]
    variants = {name: value for name, value in (("numerator", numerator), ("averaging", averaging),
                                                ("denominator", denominator)) if value is not None}
    method_options = _options_per_method(methods, variants)
    targets = [list(classes)] * len(paths) if classes else None

    unreadable: list[tuple[int, str]] = []  # (image index, why), with --skip-unreadable

    def skip(index: int, error: Exception) -> None:
        unreadable.append((index, str(error)))
        if show_bar:
            progress.update(1)

    stream = explainer.iter_explain(
        paths, methods=methods, targets=targets, top_k=top_k or 1, samples=samples,
        noise_level=noise_level, seed=seed, feature_maps=list(feature_maps) if feature_maps else None,
        neuron=list(neuron) if neuron else None, method_options=method_options,
        on_unreadable=skip if skip_unreadable else None)

    def write(index: int, per_method: dict) -> tuple[dict, list[str], int, str | None, bool]:
        """Write one image's files; (its record, its summary lines, files written, device, skipped)."""
        stem = stems[index]
        image_record = {"image": str(paths[index]), "results": [], "compare": []}
        lines, count, device, was_skipped = [], 0, None, False
        for explanation in per_method[main_method]:
            files = explanation.save(out, stem=stem, alpha=alpha, colormap=colormap, protected=protected,
                                     image_format=image_format)
            count += len(files)
            record = explanation.to_dict()
            record["files"] = {key: str(path) for key, path in files.items()}
            image_record["results"].append(record)
            device = explanation.device
            was_skipped = was_skipped or explanation.noisy_passes_skipped
            lines.append(_summary(paths[index], explanation, files["overlay"]))
        if compare:
            for figure_path in _write_compare(per_method, out, stem, alpha, colormap, protected, image_format):
                image_record["compare"].append(str(figure_path))
                count += 1
                lines.append(f"  comparison -> {figure_path}")
        return image_record, lines, count, device, was_skipped

    records, summaries = [], []
    totals = {"written": 0, "device": None, "skipped": False, "setup_s": 0.0}
    show_bar = len(paths) > 1 and stderr_is_tty()
    bar = (click.progressbar(length=len(paths), label="Explaining", file=click.get_text_stream("stderr"),
                             show_pos=True) if show_bar else
           status_line(f"Explaining {display_path(paths[0])}", show=len(paths) == 1 and stderr_is_tty()))

    def collect(future: Future) -> None:
        image_record, lines, count, device, was_skipped = future.result()
        records.append(image_record)
        summaries.extend(lines)
        if len(records) == 1:  # the rewrite (or its cache) and the sessions' warm-up: in the first results
            totals["setup_s"] = max((r["timings"].get("setup_s", 0.0) for r in image_record["results"]), default=0.0)
        totals["written"] += count
        totals["device"] = device or totals["device"]
        totals["skipped"] = totals["skipped"] or was_skipped
        if show_bar:
            progress.update(1)

    # The files of one image are written (PNG encoding releases the GIL) while the next images are
    # explained; they are collected in image order, at most WRITE_AHEAD images behind.
    pending: deque[Future] = deque()
    threads = writer_threads()
    with bar as progress, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnxcam-write") as writer:
        try:
            for index, per_method in stream:
                pending.append(writer.submit(write, index, per_method))
                while pending and (len(pending) > WRITE_AHEAD * threads or pending[0].done()):
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        finally:
            for future in pending:  # after an error: write nothing more
                future.cancel()
    written, device_used, skipped = totals["written"], totals["device"], totals["skipped"]
    if unreadable and not records:
        raise ImageError(f"none of the {len(paths)} images could be read; the first: {unreadable[0][1]}")

    elapsed = time.perf_counter() - started
    notes = _notes(skipped, explainer.gradient_model)
    if as_json:
        echo_json({
            "model": str(model), "layer": explainer.layer, "score_tensor": explainer.score,
            "method": main_method, "methods": methods, "device": device_used,
            "out": str(out), "images": records, "notes": notes,
            "skipped": [{"image": str(paths[index]), "error": why} for index, why in unreadable],
            "timings": {"total_s": round(elapsed, 4), "setup_s": round(totals["setup_s"], 4),
                        "images_per_s": round(len(records) / elapsed, 2)},
        })
        ctx.exit(1 if unreadable else 0)
    for line in summaries:
        click.echo(line)
    count = len(records)
    click.echo(f"{METHOD_TITLES[main_method]} at layer {explainer.layer}: {count} image"
               f"{'s' if count != 1 else ''}, {written} files in {out}/, {describe(device_used or 'cpu')}, "
               f"{elapsed:.2f} s" + (f" ({count / elapsed:.1f} images/s; model setup {totals['setup_s']:.2f} s)"
                                     if count > 1 else ""))
    for note in notes:
        click.echo(f"Note: {note}", err=True)
    if unreadable:
        echo_skipped([why for _, why in unreadable], len(paths), "no files were written for them")
        ctx.exit(1)


def _canonical(method: str) -> str:
    from onnxcam.cams import canonical_method_name

    return canonical_method_name(method)


def _options_per_method(methods: list[str], variants: dict[str, str]) -> dict[str, dict[str, str]]:
    """Give each method the variant options it accepts; fail on one no method accepts."""
    per_method = {m: {k: v for k, v in variants.items() if k in METHODS[m].allowed_options} for m in methods}
    for option in variants:
        if not any(option in options for options in per_method.values()):
            takers = [m for m in METHODS if option in METHODS[m].allowed_options]
            raise OptionError(f"--{option} applies to {' and '.join(takers)}, not to {', '.join(methods)}")
    return {m: options for m, options in per_method.items() if options}


_OUTPUT_NAME = re.compile(r".+_(?:%s)_(?:c\d+|n[\d+-].*)\.(?:%s)$|.+_compare(?:_(?:c\d+|n.+))?\.(?:%s)$"
                          % ("|".join(METHODS), "|".join(IMAGE_FORMATS), "|".join(IMAGE_FORMATS)))


def _without_previous_outputs(paths: list[Path], given: tuple[Path, ...], out: Path) -> list[Path]:
    """Drop, from folders expanded into images, the overlays an earlier run wrote into that same
    folder as --out (so re-running with --out equal to the image folder explains the photos,
    not the previous maps). Files named on the command line are always kept."""
    named = {os.path.realpath(p) for p in given if not Path(p).is_dir()}
    out_dir = os.path.realpath(out)
    kept = [p for p in paths if os.path.realpath(p) in named
            or os.path.dirname(os.path.realpath(p)) != out_dir or not _OUTPUT_NAME.match(p.name)]
    if not kept:
        raise OptionError(f"the only images found are onnxcam outputs in the --out folder '{out}': "
                          "name the images to explain")
    return kept


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems, with -2, -3... added where two images share a name (a/x.png, b/x.png)."""
    seen: Counter[str] = Counter()
    stems = []
    for path in paths:
        stem = path.stem
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _summary(path: Path, explanation, overlay: Path) -> str:
    if explanation.neuron is not None:
        what = f"neuron {', '.join(str(n) for n in explanation.neuron)} of {explanation.score_tensor}"
    else:
        named = explanation.label and explanation.label != f"class {explanation.class_index}"
        what = (f"{explanation.label} (class {explanation.class_index})" if named else f"class {explanation.class_index}")
        what = f"{what}, p={explanation.probability:.3f}"
        fraction = explanation.extra.get("region_fraction")
        if fraction is not None:  # a segmentation model: p is the class's mean over its region
            what = f"{what} over {fraction:.0%} of the pixels" if fraction else f"{what}, at no pixel"
    flat = " [flat map: no positive evidence]" if explanation.flat else ""
    return f"{display_path(path)}: {what}{flat} -> {overlay}"


def _write_compare(per_method, out: Path, stem: str, alpha: float, colormap: str, protected,
                   image_format: str = "png") -> list[Path]:
    """One figure per target: the image, then the Grad-CAM, Grad-CAM++, Smooth Grad-CAM++ maps."""
    from onnxcam.atomic import atomic_path

    lists = [per_method[m] for m in COMPARE_METHODS]
    several = len(lists[0]) > 1
    written = []
    for position, first in enumerate(lists[0]):
        name = f"{stem}_compare_{first.target_tag}.{image_format}" if several else f"{stem}_compare.{image_format}"
        path = out / name
        check_not_protected([path], protected)
        title = first.label if first.label is not None else f"neuron {first.target_tag[1:]}"
        panels = [(METHOD_TITLES[m], per_method[m][position].map) for m in COMPARE_METHODS]
        figure = compare_grid(first.image(), panels, alpha=alpha, colormap=colormap,
                              image_title=f"Input: {title}", seen=first.seen, region=first.region_on_image)
        with atomic_path(path) as temporary:
            figure.save(temporary, **save_options(image_format, figure=True))
        written.append(path)
    return written


def _notes(skipped: bool, gm) -> list[str]:
    from onnxcam.graph.locate import scores_output_by_default

    notes = []
    batch_built_in = gm.batch_built_in
    first = scores_output_by_default(gm.model) if gm.is_class_score else None
    if first is not None:
        notes.append(f"the model has several outputs and none is named as class scores: the {gm.num_classes} "
                     f"classes were read from the first, '{first}'. If another output holds the class "
                     "scores, name it with --scores-output.")
    if batch_built_in is not None:
        notes.append(f"the model has a batch of 1 built in (at node {batch_built_in!r}), so every image and "
                     "noisy sample ran alone, which is slower; re-export it with a dynamic batch to run "
                     "them in batches.")
    if skipped:
        notes.append("the path from layer to score is linear, so every noisy gradient equals the clean "
                     "one: Smooth Grad-CAM++ (moments) equals Grad-CAM++ here and the noisy passes were "
                     "skipped (exact). For the noise to matter pick an earlier --layer or --averaging maps.")
    return notes
