"""``onnxcam inspect``: what onnxcam sees in a model, and which layers it can explain."""

from __future__ import annotations

import os
from pathlib import Path

import click
import onnx_graphsurgeon as gs

from onnxcam.cli.common import (comma_numbers, echo_json, input_option, scores_output_option, shape_text, table,
                                value_info_rows)
from onnxcam.errors import OnnxCamError
from onnxcam.graph.input_size import sidecar_size, with_input_size
from onnxcam.explain.sidecar import read_sidecar
from onnxcam.explain.labels import metadata_value, resolve_labels
from onnxcam.gradients.backward import path_is_linear, path_nodes, unsupported_nodes
from onnxcam.graph import external
from onnxcam.graph.fixed_inputs import parse_input_options
from onnxcam.graph.locate import (SCORES_KEY, SQUASHING, candidate_layers, find_logits, image_size, score_output,
                                  scores_named)
from onnxcam.graph.prepare import load_model, model_opset, prepare, with_options
from onnxcam.graph.rewrite import automatic_layer, class_grid, is_class_score_layer
from onnxcam.imaging import PRESETS, detect_layout
from onnxcam.imaging.input_scaling import input_scaling
from onnxcam.runtime.cache import load_gradient_model

METADATA_KEYS = ("onnxcam.mean", "onnxcam.std", "onnxcam.preprocess", "onnxcam.resize", "onnxcam.crop_fraction",
                 "onnxcam.interpolation",
                 "onnxcam.labels")


@click.command("inspect", short_help="Show inputs, outputs, logits, preprocessing and candidate layers.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--size", callback=comma_numbers(int, 2, "numbers"), metavar="H,W",
              help="Input size to assume for a model whose input size is dynamic (layer shapes, "
                   "and so the candidate layers, depend on it).")
@input_option
@scores_output_option
@click.option("--no-cache", is_flag=True, help="Rewrite the model now instead of using the disk cache.")
def inspect(model: Path, as_json: bool, size: tuple[int, int] | None, fixed_inputs: tuple[str, ...],
            scores_output: str | None, no_cache: bool) -> None:
    """Show MODEL's inputs and outputs, the logits onnxcam differentiates, the preprocessing
    found in its metadata, and the candidate target layers (* = the automatic choice).

    The "path" column says whether the path from a layer to the logits is linear (for example
    global average pooling + one linear layer). On a linear path the gradient is the same for
    every input, so Smooth Grad-CAM++ with its default 'moments' averaging equals Grad-CAM++
    there: pick an earlier layer, or --averaging maps, for the noise to matter.
    """
    report = _report(model, use_cache=not no_cache, size=size, inputs=parse_input_options(fixed_inputs),
                     scores_output=scores_output)
    if as_json:
        echo_json(report)
    else:
        click.echo(_text(report))


def _report(path: Path, use_cache: bool, size: tuple[int, int] | None = None, inputs: dict | None = None,
            scores_output: str | None = None) -> dict:
    proto = load_model(with_options(path, inputs, scores_output))
    sidecar = read_sidecar(path)
    notes = []
    if size is None and (size := sidecar_size(proto, sidecar)) is not None:  # as explain does
        notes.append(f"the input size is dynamic: {size[0]}x{size[1]} from {sidecar.source} (--size overrides it)")
    if size is not None:
        proto = with_input_size(proto, size)
    report: dict = {
        "model": os.fspath(path), "size_bytes": path.stat().st_size,
        "external_data_bytes": external.data_bytes(path),
        "ir_version": proto.ir_version, "opset": model_opset(proto),
        "producer": " ".join(p for p in (proto.producer_name, proto.producer_version) if p) or None,
        "inputs": value_info_rows([i for i in proto.graph.input
                                   if i.name not in {t.name for t in proto.graph.initializer}]),
        "outputs": value_info_rows(proto.graph.output),
        "metadata": {key: metadata_value(proto, key) for key in METADATA_KEYS
                     if metadata_value(proto, key) is not None},
        "sidecar": None if sidecar is None else {
            "files": list(sidecar.files), "mean": sidecar.mean, "std": sidecar.std, "resize": sidecar.resize,
            "crop_fraction": sidecar.crop_fraction, "interpolation": sidecar.interpolation,
            "size": sidecar.size, "labels": len(sidecar.labels) if sidecar.labels else None},
        "notes": notes,
    }
    preparation = prepare(proto)
    graph = gs.import_onnx(preparation.model)
    graph.toposort()
    named = scores_named(proto)
    logits = find_logits(graph, named) if graph.outputs else None
    output = score_output(graph, named) if graph.outputs else None
    if len(graph.outputs) > 1:
        others = ", ".join(o.name for o in graph.outputs if o is not output)
        other_choice = f"--scores-output or the metadata {SCORES_KEY} can name another"
        why = ("--scores-output says so" if scores_output is not None else
               f"the metadata {SCORES_KEY} says so; --scores-output overrides it" if named else
               f"its name says so; {other_choice}" if output is not graph.outputs[0] else
               f"the first; {other_choice}")
        notes.append(f"the model has {len(graph.outputs)} outputs: the class scores are read from "
                     f"'{output.name}' ({why}); not from {others}.")
    after = _ops_between(logits, output) if logits is not None else []
    report["logits"] = ({"tensor": logits.name, "shape": list(logits.shape) if logits.shape else None,
                         "output": output.name, "pre_softmax": logits.name != output.name,
                         "squashed": any(op in SQUASHING for op in after),
                         "argmax": "ArgMax" in after} if logits is not None else None)
    grid, class_axis = (class_grid(logits, image_size(graph)) if logits is not None else None) or (None, -1)
    classes = logits.shape[class_axis] if logits is not None and logits.shape else None
    classes = classes if isinstance(classes, int) else None
    report["classes"] = classes
    report["pixel_grid"] = list(grid) if grid else None  # a segmentation model: classes per pixel
    try:
        labels, source = resolve_labels(
            classes, None, proto,
            sidecar=(sidecar.labels, sidecar.labels_source) if sidecar and sidecar.labels else None)
        report["labels"] = {"source": source, "first": labels[:3] if labels else None}
    except OnnxCamError as exc:
        report["labels"] = {"source": "invalid", "error": str(exc)}
    try:
        layout, size, channels = detect_layout(report["inputs"][0]["shape"] or [], name="the model input")
        report["layout"] = {"layout": layout, "size": list(size), "channels": channels}
    except (OnnxCamError, IndexError) as exc:
        report["layout"] = None
        report["notes"].append(str(exc) if isinstance(exc, OnnxCamError) else "the model has no inputs")
    report["preprocessing"] = _preprocessing_text(report["metadata"], input_scaling(proto), sidecar)

    rows, automatic = [], None
    if logits is not None:
        tensors = graph.tensors()
        candidates = candidate_layers(graph, logits)
        automatic = automatic_layer(graph, candidates, logits, classes if grid else None)
        for candidate in candidates:
            nodes = path_nodes(graph, tensors[candidate.tensor], logits)
            rows.append({"tensor": candidate.tensor, "node": candidate.node, "op": candidate.op,
                         "shape": list(candidate.shape), "layout": candidate.layout,
                         "path_linear": path_is_linear(nodes, tensors[candidate.tensor]),
                         "supported": not unsupported_nodes(nodes), "automatic": candidate == automatic})
    report["candidates"] = rows
    report["automatic_layer"] = automatic.tensor if automatic else None
    if rows and automatic is not None and rows[-1]["tensor"] != automatic.tensor:
        report["notes"].append(_why_not_later(automatic, candidates, classes if grid else None))

    try:
        gm, _ = load_gradient_model(path if size is None and not inputs and scores_output is None else proto,
                                    use_cache=use_cache)
        report["explainable"] = True
        report["automatic_path_linear"] = gm.path_is_linear
        report["batch_built_in"] = gm.batch_built_in
        if gm.batch_built_in:
            report["notes"].append(
                f"the model has a batch of 1 built in (at node {gm.batch_built_in!r}): onnxcam runs it one "
                "image, and one noisy sample, at a time, which is slower; re-export it with a dynamic batch "
                "to run them in batches.")
        if gm.path_is_linear:
            earlier = [r["tensor"] for r in rows if not r["path_linear"] and r["supported"]]
            example = f", e.g. --layer {earlier[-1]}" if earlier else ""
            report["notes"].append(
                f"the path from the automatic layer {gm.layer} to the logits is linear: its gradient is "
                "the same for every input, so Smooth Grad-CAM++ (moments averaging, the default) equals "
                "Grad-CAM++ there (onnxcam then skips the noisy passes, exactly). For the noise to "
                f"matter use an earlier layer with a non-linear path{example}, or --averaging maps.")
    except OnnxCamError as exc:
        report["explainable"] = False
        report["automatic_path_linear"] = None
        report["batch_built_in"] = None
        report["notes"].append(f"cannot explain with the automatic layer: {' '.join(str(exc).split())}")
    return report


def _ops_between(logits: gs.Tensor, output: gs.Tensor) -> list[str]:
    """The ops from the logits to the model's score output (a Softmax, LogSoftmax or Sigmoid
    among them: the output is squashed)."""
    tensor = output
    seen = []
    while tensor is not logits and len(tensor.inputs) == 1:
        seen.append(tensor.inputs[0].op)
        tensor = tensor.inputs[0].inputs[0]
    return seen


def _why_not_later(automatic, candidates, pixel_classes: int | None) -> str:
    """Why the automatic layer is not the last candidate: a segmentation model's later layers are
    its class scores per pixel; a ViT's later token layers reach the score through the class token."""
    later = candidates[candidates.index(automatic) + 1:]
    if pixel_classes and all(is_class_score_layer(c, pixel_classes) for c in later):
        return (f"the automatic layer is {automatic.tensor}, the last feature map: the later layers have "
                f"{pixel_classes} channels, one per class, the class scores themselves (the head's output and "
                "its upsampling), whose map of a class would be that class's own scores.")
    return (f"the automatic layer is {automatic.tensor}, not a later token layer: after the last attention "
            "only the class token reaches the score, so every patch's gradient there is 0 and so would be the map.")


def _preprocessing_text(metadata: dict, scaling, sidecar=None) -> str:
    found = {k: v for k, v in metadata.items() if k != "onnxcam.labels"}
    if sidecar is not None and (sidecar.describes_preprocessing or sidecar.resize):
        said = {"mean": _rounded(sidecar.mean), "std": _rounded(sidecar.std), "resize": sidecar.resize,
                "crop_fraction": sidecar.crop_fraction, "interpolation": sidecar.interpolation}
        text = ", ".join(f"{k}={v}" for k, v in said.items() if v is not None)
        if not found:
            return f"from {sidecar.source}: {text} (0-1 units)"
        return (", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in found.items())
                + f"; where the metadata is silent, {sidecar.source}: {text}")
    if not found and scaling is not None:
        return (f"none in the metadata; {scaling.describe()}, so the '{scaling.preset}' preset is used "
                f"({PRESETS[scaling.preset].description}); pass --preprocess or --mean/--std if the model "
                "expects otherwise")
    if not found:
        return ("none in the metadata: the 'imagenet' preset is used (RGB/255, ImageNet mean/std); "
                "pass --preprocess or --mean/--std if the model expects otherwise")
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in found.items())


def _rounded(values):
    return None if values is None else ",".join(f"{v:.6g}" for v in values)


def _text(report: dict) -> str:
    outside = report["external_data_bytes"]
    outside = f" + {outside:,} in external data" if outside else ""
    lines = [f"Model: {report['model']} ({report['size_bytes']:,} bytes{outside}, opset {report['opset']}, "
             f"IR {report['ir_version']}{', ' + report['producer'] if report['producer'] else ''})", ""]
    lines.append("Inputs:")
    lines += [f"  {r['name']}  {shape_text(r['shape'])}  {r['dtype']}" for r in report["inputs"]]
    lines.append("Outputs:")
    lines += [f"  {r['name']}  {shape_text(r['shape'])}  {r['dtype']}" for r in report["outputs"]]
    logits = report["logits"]
    if logits:
        kind = ("the scores the output's ArgMax picks from" + (", before their squashing" if logits["squashed"] else "")
                if logits["argmax"] else
                "pre-softmax input of the output's squashing" if logits["squashed"] else
                "the output before its quantization" if logits["pre_softmax"] else "the output itself")
        lines.append(f"Logits: {logits['tensor']} {shape_text(logits['shape'])} ({kind}), "
                     f"{report['classes'] or '?'} class{'' if report['classes'] == 1 else 'es'}"
                     + (" per pixel (a segmentation model: a class's score is the sum of its logits over "
                        "the pixels it is predicted at)" if report["pixel_grid"] else ""))
    labels = report.get("labels") or {}
    lines.append(f"Labels: {labels.get('source')}"
                 + (f" ({', '.join(labels['first'])}, ...)" if labels.get("first") else ""))
    if report["layout"]:
        layout = report["layout"]
        size = "x".join("?" if d is None else str(d) for d in layout["size"])
        lines.append(f"Layout: {layout['layout']}, {layout['channels']} channels, {size}")
    lines.append(f"Preprocessing: {report['preprocessing']}")
    if report["explainable"]:
        built_in = report["batch_built_in"]
        lines.append("Batch: " + (f"1, built in at node {built_in!r}" if built_in else "any (runs in batches)"))
    lines.append("")
    if report["candidates"]:
        lines.append(f"Candidate target layers ({len(report['candidates'])}, * = automatic):")
        rows = [["*" if r["automatic"] else "", r["tensor"], r["op"], shape_text(r["shape"]), r["layout"],
                 ("linear" if r["path_linear"] else "non-linear") + ("" if r["supported"] else ", unsupported op")]
                for r in report["candidates"]]
        lines.append(table(rows, ["", "tensor", "op", "shape", "layout", "path to logits"]))
    elif report["layout"] and None in report["layout"]["size"]:
        lines.append("Candidate target layers: unknown while the input size is dynamic (layer shapes depend "
                     "on it): pass --size H,W")
    elif len(report["inputs"]) > 1:
        lines.append("Candidate target layers: unknown while the model has inputs besides the image: give "
                     "their values with --input NAME=VALUE")
    else:
        lines.append("Candidate target layers: none (no 4-D activation with spatial size >= 2 that every "
                     "path to the logits passes through)")
    for note in report["notes"]:
        lines.append("")
        lines.append(f"Note: {note}")
    return "\n".join(lines)
