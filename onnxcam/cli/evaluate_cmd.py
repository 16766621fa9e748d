"""``onnxcam evaluate``: score CAM methods on a data set (pointing games, Average Drop, Increase
in Confidence, Deletion/Insertion, instance coverage) and write results.json, results.csv and
curves.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from onnxcam.atomic import atomic_path
from onnxcam.cli.common import (batch_size_option, device_option, echo_json, echo_skipped, input_option,
                                preprocess_option, resize_options, scores_output_option, status_line,
                                stderr_is_tty)
from onnxcam.errors import ImageError, OptionError
from onnxcam.explain import Explainer
from onnxcam.explain.result import check_not_protected
from onnxcam.graph.fixed_inputs import parse_input_options
from onnxcam.imaging.io import PNG_SAVE_OPTIONS
from onnxcam.runtime.providers import describe


def _baseline(ctx, param, value):
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("zeros", "mean", "blur"):
        return text
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not zeros, mean, blur or a number") from None


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-m", "--methods", default="gradcam,gradcampp,smoothgradcampp", show_default=True,
              metavar="M1,M2",
              help="Comma-separated methods; a variant as METHOD:option=value "
                   "(smoothgradcampp:averaging=maps), a layer of its own as METHOD@LAYER.")
@click.option("-l", "--layer", metavar="NAME", help="Target layer for the methods without @LAYER "
                                                    "(default: the automatic choice).")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=25, show_default=True,
              help="Noisy samples per image (Smooth Grad-CAM++).")
@click.option("--noise-level", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Noise sigma as a fraction of each image's value range.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps of the deletion and insertion curves.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Pointing game tolerance, in pixels of the model input.")
@click.option("--coverage-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="An instance is covered where the map reaches this fraction of its maximum.")
@click.option("--deletion-baseline", callback=_baseline, default="zeros", show_default=True,
              metavar="zeros|mean|blur|NUMBER", help="What deleted pixels become (in the model's input space).")
@click.option("--insertion-baseline", callback=_baseline, default="blur", show_default=True,
              metavar="zeros|mean|blur|NUMBER", help="The image the pixels are inserted into.")
@click.option("--blur-sigma", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Gaussian blur of the 'blur' baselines, in input pixels.")
@click.option("--target", type=click.Choice(["label", "predicted"], case_sensitive=False), default="label",
              show_default=True, help="Explain the ground-truth class (predicted class where none) or "
                                      "always the predicted class.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the first N samples.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("onnxcam-eval"), show_default=True,
              help="Folder for results.json, results.csv and curves.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
@device_option
@batch_size_option
@preprocess_option
@resize_options
@click.option("--labels", type=click.Path(path_type=Path), metavar="FILE",
              help="Class names (to map the data set's class names to indices).")
@input_option
@scores_output_option
@click.option("--no-cache", is_flag=True, help="Rewrite the model now instead of using the disk cache.")
@click.option("--skip-unreadable", is_flag=True,
              help="Leave out the samples whose image cannot be read, instead of stopping: the metrics "
                   "cover the others, results.json lists them under 'skipped', and the exit status is 1.")
@click.pass_context
def evaluate(ctx, model, data, methods, layer, samples, noise_level, seed, steps, tolerance, coverage_threshold,
             deletion_baseline, insertion_baseline, blur_sigma, target, limit, out, as_json, device,
             batch_size, preprocess, resize, crop_fraction, interpolation, labels, fixed_inputs, scores_output,
             no_cache, skip_unreadable):
    """Score CAM methods on the images of DATA with their ground truth.

    DATA is a folder of images with a manifest.json (classes and boxes), a CSV manifest
    (image,label,x0,y0,x1,y1 rows), Pascal VOC XML files next to the images, or mask PNGs
    (masks/<stem>.png); or a manifest file itself. Images without ground truth still get the
    faithfulness metrics (for the predicted class).

    \b
    Prints a table (one row per method) and writes into --out, atomically:
      results.json   settings, the table, per-image values, mean curves, timings
      results.csv    the table
      curves.png     mean deletion and insertion curves per method

    \b
    Examples:
      onnxcam evaluate models/shapes_cnn.onnx models/localization
      onnxcam evaluate model.onnx data/ --methods gradcam,smoothgradcampp:averaging=maps --limit 50
      onnxcam evaluate model.onnx data/ --tolerance 0 --deletion-baseline blur --json
    """
    from onnxcam.evaluation import evaluate as run_evaluation
    from onnxcam.evaluation import drop_unreadable, load_dataset, parse_methods
    from onnxcam.evaluation.plot import curves_figure

    started = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out '{out}' is a file: give a folder for the results")
    specs = parse_methods(methods, layer)  # a bad method fails before any work
    with status_line(f"Preparing {Path(model).name}",
                     show=stderr_is_tty() and not as_json):
        explainer = Explainer(model, layer=layer, device=device, batch_size=batch_size, preprocess=preprocess,
                              resize=resize, crop_fraction=crop_fraction, interpolation=interpolation,
                              labels=labels, cache=not no_cache,
                              inputs=parse_input_options(fixed_inputs), scores_output=scores_output)
    dataset = load_dataset(data, labels=explainer.labels, num_classes=explainer.num_classes).limit(limit)
    files = {"results": out / "results.json", "csv": out / "results.csv", "curves": out / "curves.png"}
    protected = [model, *(s.image for s in dataset.samples), *(s.mask_path for s in dataset.samples if s.mask_path)]
    if dataset.manifest is not None:
        protected.append(dataset.manifest)
    check_not_protected(files.values(), protected)
    unreadable = []
    if skip_unreadable:
        total = len(dataset)
        dataset, unreadable = drop_unreadable(explainer, dataset)
        if not dataset.samples:
            raise ImageError(f"none of the {total} images could be read; the first: {unreadable[0][1]}")

    show = stderr_is_tty() and not as_json
    state = {"stage": None}

    def progress(stage: str, done: int, total: int) -> None:
        if not show:
            return
        if stage != state["stage"]:
            if state["stage"] is not None:
                click.echo("", err=True)
            state["stage"] = stage
        click.echo(f"\r{stage}: {done}/{total}", nl=False, err=True)

    result = run_evaluation(explainer, dataset, specs, samples=samples, noise_level=noise_level, seed=seed,
                            steps=steps, tolerance=tolerance, coverage_threshold=coverage_threshold,
                            deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline,
                            blur_sigma=blur_sigma, target=target.lower(), progress=progress)
    if show and state["stage"] is not None:
        click.echo("", err=True)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"cannot create the output folder '{out}' ({exc.strerror or exc})") from None
    document = result.to_dict()
    document["files"] = {key: str(path) for key, path in files.items()}
    document["skipped"] = [{"image": str(sample.image), "error": why} for sample, why in unreadable]
    document["timings"]["command_s"] = round(time.perf_counter() - started, 4)
    figure = curves_figure(result.fractions, result.curves,
                           titles=_legends(result.rows),
                           title=f"{Path(str(model)).name} on {dataset.root.name or data} "
                                 f"({len(dataset)} images)")
    with atomic_path(files["results"]) as json_path, atomic_path(files["csv"]) as csv_path, \
            atomic_path(files["curves"]) as png_path:
        json_path.write_bytes(json.dumps(document, indent=2, allow_nan=False).encode("utf-8") + b"\n")
        csv_path.write_text(result.csv_text(), encoding="utf-8")
        figure.save(png_path, **PNG_SAVE_OPTIONS)

    if as_json:
        echo_json(document)
        ctx.exit(1 if unreadable else 0)
    summary = result.summary
    accuracy = (f"accuracy {summary['accuracy']:.3f} on {summary['labelled']} labelled"
                if summary["accuracy"] is not None else "no labels")
    click.echo(f"{dataset.describe()}; {accuracy}; {summary['multi_instance']} with several instances")
    click.echo(result.table_text())
    settings = result.settings
    fitted = settings["preprocessing"]
    how = {"crop": f", centre crop {fitted.get('crop_fraction')}", "pad": ", padded",
           "stretch-crop": f", stretched and cropped {fitted.get('crop_fraction')}"}.get(fitted["resize"], "")
    click.echo(f"Maps at {settings['map_size'][0]}x{settings['map_size'][1]} (model input{how}); pointing tolerance "
               f"{tolerance:g} px; deletion to {settings['deletion_baseline']}, insertion from "
               f"{settings['insertion_baseline']}; {steps} steps; {describe(settings['device'])}, "
               f"{time.perf_counter() - started:.1f} s")
    click.echo(f"Wrote {files['results']}, {files['csv']}, {files['curves']}")
    if any(row["noisy_passes_skipped"] for row in result.rows):
        click.echo("Note: the path from the layer to the score is linear, so Smooth Grad-CAM++ (moments) "
                   "equals Grad-CAM++ there; use an earlier layer (METHOD@LAYER) or "
                   "smoothgradcampp:averaging=maps for the noise to matter.", err=True)
    if unreadable:
        echo_skipped([why for _, why in unreadable], len(dataset) + len(unreadable), "the metrics cover the others")
        ctx.exit(1)


def _legends(rows: list[dict]) -> dict[str, str]:
    """Legend texts: the method's title, with its layer when the methods use several layers."""
    several = len({row["layer"] for row in rows}) > 1
    return {row["method"]: row["title"] + (f" @ {_short_layer(row['layer'])}" if several else "") for row in rows}


def _short_layer(layer: str) -> str:
    """"/features/relu5/Relu_output_0" -> "relu5/Relu": the last two parts of a path-like name."""
    name = layer[:-len("_output_0")] if layer.endswith("_output_0") else layer
    parts = [part for part in name.split("/") if part]
    short = "/".join(parts[-2:]) if parts else layer
    return short if len(short) <= 32 else "..." + short[-29:]
