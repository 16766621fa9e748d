"""``onnxcam check``: a deployment gate for explanations, configured in TOML (exit 0 pass, 1 fail,
2 bad configuration or input)."""

from __future__ import annotations

from pathlib import Path

import click

from onnxcam.atomic import atomic_write_bytes
from onnxcam.cli.common import echo_json
from onnxcam.errors import OptionError


@click.command("check", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--junit", type=click.Path(path_type=Path), metavar="FILE",
              help="Also write the results as JUnit XML (one testcase per check).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
@click.pass_context
def check(ctx, config, junit, as_json):
    """Run the explanation checks of the TOML file CONFIG.

    \b
    The file names the model, the method and its images, each with its expected class and,
    optionally, a region box [x0, y0, x1, y1] in the image's pixels:
      model = "model.onnx"
      method = "gradcampp"
      [thresholds]
      tolerance = 15            # pointing: map maximum within 15 px of the region
      min_energy = 0.3          # share of the map's energy inside the region
      max_average_drop = 60     # Average Drop %, over all images
      [[images]]
      path = "cat.png"
      class = "tabby"
      region = [20, 30, 180, 200]

    Relative paths are relative to the TOML file's folder. One line per check (PASS/FAIL, name,
    measured value vs threshold). Exit code 0 when every check passes, 1 when one fails,
    2 for a bad configuration, model or image.

    \b
    Examples:
      onnxcam check checks.toml
      onnxcam check checks.toml --junit reports/explanations.xml
    """
    from onnxcam.evaluation.check import junit_xml, load_check_config, run_checks

    if junit is not None and junit.is_dir():
        raise OptionError(f"--junit '{junit}' is a folder: give a file name for the JUnit XML")
    settings = load_check_config(config)
    protected = {p.resolve() for p in [settings.model, settings.path, *(i.path for i in settings.images)]}
    if junit is not None and junit.resolve() in protected:
        raise OptionError(f"refusing to write '{junit}': it is one of the input files; choose another --junit file")
    report = run_checks(settings)
    if junit is not None:
        if not junit.parent.exists():
            try:
                junit.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptionError(f"cannot create the folder of --junit '{junit}' ({exc.strerror or exc})") from None
        atomic_write_bytes(junit, junit_xml(report))
    if as_json:
        document = report.to_dict()
        if junit is not None:
            document["junit"] = str(junit)
        echo_json(document)
    else:
        click.echo(f"{settings.name}: {settings.method} at {report.layer} on {len(settings.images)} image"
                   f"{'s' if len(settings.images) != 1 else ''} ({settings.model})")
        click.echo(report.text())
        if junit is not None:
            click.echo(f"JUnit XML: {junit}")
    if not report.passed:
        ctx.exit(1)
