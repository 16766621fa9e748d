"""``onnxcam rewrite``: save the gradient model for use outside onnxcam."""

from __future__ import annotations

import os
from pathlib import Path

import click

from onnxcam.cli.common import input_option, scores_output_option, shape_text, value_info_rows
from onnxcam.errors import OptionError
from onnxcam.graph import external
from onnxcam.graph.external import write_model
from onnxcam.graph.fixed_inputs import parse_input_options
from onnxcam.graph.prepare import with_options
from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED
from onnxcam.runtime.cache import load_gradient_model

ROLE = {
    SEED: "input: cotangent of the score, e.g. one-hot rows [N, classes] picking the class",
    ACTIVATION: "output: the target layer's activation A, channels first",
    GRADIENT: "output: d<seed, score>/dA, shaped like A",
    LOGITS: "output: the pre-softmax logits [N, classes]",
}


@click.command("rewrite", short_help="Save the model with the gradient appended (standard ONNX).",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Where to write the gradient model (.onnx); never MODEL itself.")
@click.option("-l", "--layer", metavar="NAME", help="Target layer (default: the automatic choice).")
@click.option("--score", metavar="TENSOR", help="Differentiate this tensor instead of the logits.")
@input_option
@scores_output_option
def rewrite(model: Path, out: Path, layer: str | None, score: str | None, fixed_inputs: tuple[str, ...],
            scores_output: str | None) -> None:
    """Write MODEL with the gradient of the score appended, as standard ONNX operators.

    The written model keeps MODEL's inputs and outputs and adds:

    \b
      onnxcam_seed        input   cotangent of the score: [N, classes] for the logits
                                  (a one-hot row picks a class), or the --score tensor's shape
      onnxcam_activation  output  the target layer's activation A, channels first
                                  (a channels-last layer transposed, ViT patch
                                  tokens on their grid)
      onnxcam_gradient    output  d<seed, score>/dA, shaped like A
      onnxcam_logits      output  the pre-softmax logits [N, classes]

    Any ONNX runtime can then compute Grad-CAM-style maps from one run.
    """
    if out.exists() and _same_file(out, model):
        raise OptionError(f"refusing to overwrite the input model '{model}': give another -o/--output")
    source = with_options(model, parse_input_options(fixed_inputs), scores_output)
    gm, _ = load_gradient_model(source, layer=layer, score=score)
    # a model that came as one file goes out as one file, though the cache keeps its weights apart
    one_file = (not external.has_external_data(source) if source is not model
                else external.data_bytes(model) == 0)
    data = write_model(gm.model, out, inline=one_file)
    weights = f", its weights in {data}" if data is not None else ""
    click.echo(f"Wrote {out} (layer {gm.layer}, score {gm.score}{weights})")
    click.echo("Inputs:")
    for row in value_info_rows(gm.model.graph.input):
        role = f"  {ROLE[row['name']]}" if row["name"] in ROLE else ""
        click.echo(f"  {row['name']}  {shape_text(row['shape'])}  {row['dtype']}{role}")
    click.echo("Outputs:")
    for row in value_info_rows(gm.model.graph.output):
        role = f"  {ROLE[row['name']]}" if row["name"] in ROLE else ""
        click.echo(f"  {row['name']}  {shape_text(row['shape'])}  {row['dtype']}{role}")
    if gm.batch_built_in:
        click.echo(f"Note: the model has a batch of 1 built in (at node {gm.batch_built_in!r}): feed the "
                   "written model one row at a time.", err=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
