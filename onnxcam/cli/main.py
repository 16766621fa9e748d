"""The ``onnxcam`` command group and its error handling.

Every OnnxCamError (a problem with the user's model, images or options) becomes one line
``Error: ...`` on stderr and exit code 2, with no traceback; click's usage errors also exit 2;
anything else is an internal error: one line, exit code 1. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback

import click

from onnxcam import __version__
from onnxcam.cli.common import one_line
from onnxcam.errors import OnnxCamError

PASS_THROUGH = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                KeyboardInterrupt, SystemExit, GeneratorExit)


class OnnxCamGroup(click.Group):
    """A click group that turns exceptions from its commands into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PASS_THROUGH:
            raise
        except BrokenPipeError:  # output piped into `head`: not an error worth a message
            sys.stderr.close()
            ctx.exit(1)
        except OnnxCamError as exc:
            _report(ctx, "Error: " + one_line(exc), 2)
        except Exception as exc:  # noqa: BLE001 - everything else is our bug
            _report(ctx, f"Internal error: {type(exc).__name__}: {one_line(exc)} "
                         "(run with --debug for the traceback)", 1)


def _report(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("debug"):
        traceback.print_exc(file=sys.stderr)
    click.echo(message, err=True)
    ctx.exit(code)


@click.group(cls=OnnxCamGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="onnxcam")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Explain ONNX image models with gradient class activation maps.

    Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, XGrad-CAM, LayerCAM and HiResCAM for any exported
    ONNX classifier or segmentation model, with no deep-learning framework: the gradient is
    appended to the model as standard ONNX operators and ONNX Runtime computes it.

    \b
    Examples:
      onnxcam inspect model.onnx
      onnxcam explain model.onnx cat.jpg --compare
      onnxcam explain model.onnx photos/ --method gradcampp --top-k 3 --out maps
      onnxcam rewrite model.onnx -o model_grad.onnx
      onnxcam evaluate model.onnx data/ --methods gradcam,gradcampp,smoothgradcampp
      onnxcam check checks.toml --junit cam-report.xml
      onnxcam compare model.onnx model_int8.onnx photos/
      onnxcam cache --clear
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from onnxcam.cli.cache_cmd import cache
    from onnxcam.cli.check_cmd import check
    from onnxcam.cli.compare_cmd import compare
    from onnxcam.cli.evaluate_cmd import evaluate
    from onnxcam.cli.explain_cmd import explain
    from onnxcam.cli.inspect_cmd import inspect
    from onnxcam.cli.rewrite_cmd import rewrite

    cli.add_command(explain)
    cli.add_command(inspect)
    cli.add_command(rewrite)
    cli.add_command(evaluate)
    cli.add_command(check)
    cli.add_command(compare)
    cli.add_command(cache)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``onnxcam = "onnxcam.cli.main:main"``)."""
    cli.main(args=argv, prog_name="onnxcam")


if __name__ == "__main__":  # pragma: no cover
    main()
