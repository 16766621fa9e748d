"""Helpers shared by the commands: parsing comma-separated values, one-line messages, shapes."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

import click
import onnx
from onnx import helper


def one_line(exc: BaseException | str) -> str:
    """A message squeezed onto one line (newlines and runs of spaces become single spaces)."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        return type(exc).__name__
    return text


def comma_numbers(kind, count: int | None = None, what: str = "values"):
    """A click callback parsing "a,b,c" into a tuple of ``kind`` (int or float)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        values = value if isinstance(value, tuple) else (value,)
        parsed = []
        for text in values:
            try:
                numbers = tuple(kind(part) for part in str(text).replace(" ", "").split(",") if part != "")
            except ValueError:
                raise click.BadParameter(f"{text!r} is not comma-separated {what}") from None
            if not numbers or (count is not None and len(numbers) != count):
                need = f"{count} comma-separated {what}" if count else f"comma-separated {what}"
                raise click.BadParameter(f"{text!r} must be {need}")
            parsed.append(numbers)
        return tuple(parsed) if isinstance(value, tuple) else parsed[0]

    return parse


def value_info_rows(values) -> list[dict]:
    """[{name, shape, dtype}] for graph inputs/outputs."""
    rows = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else None
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:  # noqa: BLE001
            dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        rows.append({"name": value.name, "shape": dims, "dtype": dtype})
    return rows


def shape_text(shape) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def echo_json(document) -> None:
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def status_line(text: str, show: bool) -> Iterator[None]:
    """``text`` on stderr while the block runs (a terminal only), erased afterwards: the first
    rewrite of a large model takes tens of seconds with nothing else to show."""
    if show:
        click.echo(f"{text}...", err=True, nl=False)
    try:
        yield
    finally:
        if show:
            click.echo("\r\x1b[K", err=True, nl=False)


# Options that several commands share, defined once so their names, defaults and help agree.
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"], case_sensitive=False), default="auto",
    show_default=True, help="auto: CUDA when onnxruntime can really use it, else CPU.")
batch_size_option = click.option(
    "-b", "--batch-size", type=click.IntRange(min=1), metavar="N",
    help="Inputs per onnxruntime run (default: from the model's sizes, at most 13 on the CPU and 32 on CUDA).")


def echo_skipped(reasons: list[str], total: int, consequence: str) -> None:
    """The files --skip-unreadable left out, one line each, and a count of them (on stderr)."""
    for why in reasons:
        click.echo(f"Skipped: {why}", err=True)
    click.echo(f"Skipped {len(reasons)} unreadable image{'s' if len(reasons) != 1 else ''} of {total} "
               f"(--skip-unreadable): {consequence}", err=True)


input_option = click.option(
    "--input", "fixed_inputs", multiple=True, metavar="NAME=VALUE",
    help="Fix a model input other than the image to VALUE: a number, true/false, numbers separated "
         "by commas, or a .npy file (repeat for several inputs).")


scores_output_option = click.option(
    "--scores-output", metavar="NAME",
    help="The model output that holds the class scores, for a model with several (default: the "
         "metadata onnxcam.scores, else the first output named like logits, scores or probs, else "
         "the first; 'onnxcam inspect MODEL' says which).")


def resize_options(func):
    """--resize, --crop-fraction and --interpolation: how an image of any size is brought to the
    model's size."""
    from onnxcam.imaging.fit import INTERPOLATIONS, RESIZE_MODES

    func = click.option("--interpolation", type=click.Choice(list(INTERPOLATIONS), case_sensitive=False),
                        help="Pillow's resampling filter (default: model metadata, a Hugging Face or timm "
                             "config next to the model, else bilinear).")(func)
    func = click.option("--crop-fraction", type=click.FloatRange(0, 1, min_open=True), metavar="F",
                        help="With --resize crop or stretch-crop: the share of the resized image the crop "
                             "keeps (default: the model's metadata or config for that mode, else 0.875: "
                             "Resize(256) + CenterCrop(224)).")(func)
    return click.option("--resize", type=click.Choice(RESIZE_MODES, case_sensitive=False),
                        help="How an image meets the model's size: stretch the whole image, crop its "
                             "centre keeping the aspect ratio (torchvision's Resize + CenterCrop), "
                             "stretch-crop (stretch to size / fraction, then crop), or pad it (default: "
                             "model metadata, a Hugging Face or timm config next to the model, else "
                             "stretch).")(func)


def preprocess_option(func):
    from onnxcam.imaging import PRESETS

    return click.option("--preprocess", type=click.Choice(sorted(PRESETS), case_sensitive=False),
                        help="Input normalisation preset (default: the model's metadata, else "
                             "imagenet).")(func)
