"""``onnxcam compare``: the same explanation from two models, image by image (a regression check:
exit 1 when an image's maps disagree more than the threshold allows)."""

from __future__ import annotations

from pathlib import Path

import click

from onnxcam.cli.common import device_option, echo_json, input_option, resize_options, scores_output_option, table
from onnxcam.graph.fixed_inputs import parse_input_options
from onnxcam.imaging import find_images
from onnxcam.imaging.io import display_path


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--method", default="gradcam", show_default=True, metavar="METHOD",
              help="gradcam, gradcampp, smoothgradcampp, xgradcam, layercam or hirescam.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.8, show_default=True,
              help="Minimum Spearman rank correlation of the two maps, per image.")
@click.option("--min-iou", type=click.FloatRange(0, 1), metavar="X",
              help="Also require this IoU of the top-20% regions, per image.")
@click.option("-c", "--class", "class_index", metavar="INT|NAME",
              help="Class to explain in every image, by index or by model A's label (default: model "
                   "A's prediction).")
@click.option("--layer-a", metavar="NAME", help="Target layer in model A (default: automatic).")
@click.option("--layer-b", metavar="NAME", help="Target layer in model B (default: automatic).")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=25, show_default=True,
              help="Noisy samples per image (Smooth Grad-CAM++).")
@click.option("--noise-level", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Noise sigma as a fraction of each image's value range.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise.")
@device_option
@click.option("-b", "--batch-size", type=click.IntRange(min=1), metavar="N", help="Inputs per onnxruntime run.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON document.")
@input_option
@scores_output_option
@resize_options
@click.option("--no-cache", is_flag=True, help="Rewrite the models now instead of using the disk cache.")
@click.pass_context
def compare(ctx, model_a, model_b, images, method, threshold, min_iou, class_index, layer_a, layer_b,
            samples, noise_level, seed, device, batch_size, as_json, fixed_inputs, scores_output, resize, crop_fraction,
            interpolation, no_cache):
    """Explain IMAGES with MODEL_A and MODEL_B and compare the maps.

    Both models explain the same class (model A's prediction, or --class) with the same method
    and noise. Per image: the Spearman rank correlation of the two maps and the IoU of their
    top-20% regions, at the model input resolution. Exit code 1 when any image's correlation is
    below --threshold (or its IoU below --min-iou): the explanation regressed. 0 otherwise.

    \b
    Examples:
      onnxcam compare model.onnx model_int8.onnx photos/
      onnxcam compare old.onnx new.onnx a.jpg b.jpg --method gradcampp --threshold 0.9 --json
    """
    from onnxcam.evaluation.compare import compare_models

    paths = find_images(images)
    result = compare_models(model_a, model_b, paths, method, threshold=threshold, min_iou=min_iou,
                            class_index=class_index, layer_a=layer_a, layer_b=layer_b, samples=samples,
                            noise_level=noise_level, seed=seed, device=device, batch_size=batch_size,
                            cache=not no_cache, inputs=parse_input_options(fixed_inputs),
                            scores_output=scores_output, resize=resize,
                            crop_fraction=crop_fraction, interpolation=interpolation)
    if as_json:
        echo_json(result.to_dict())
    else:
        rows = []
        for record in result.images:
            prediction = (f"{record['predicted_a']}/{record['predicted_b']}"
                          + ("" if record["predicted_a"] == record["predicted_b"] else " (differ)"))
            rows.append([display_path(record["image"]), f"{record['label'] or record['class']}",
                         prediction, f"{record['correlation']:.3f}", f"{record['iou']:.3f}",
                         "ok" if record["passed"] else "REGRESSED"])
        click.echo(table(rows, ["image", "class", "pred A/B", "rank corr", "top-20% IoU", "status"]))
        summary = result.to_dict()
        need = f"correlation >= {threshold:g}" + (f", IoU >= {min_iou:g}" if min_iou is not None else "")
        click.echo(f"{result.method}: mean correlation {summary['mean_correlation']:.3f}, mean IoU "
                   f"{summary['mean_iou']:.3f} at {result.size[0]}x{result.size[1]}; "
                   + (f"all {len(result.images)} images pass ({need})" if result.passed
                      else f"{result.failures} of {len(result.images)} images below ({need})"))
    if not result.passed:
        ctx.exit(1)
