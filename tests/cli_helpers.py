"""Running the CLI in-process and checking its one-line errors (shared by the CLI tests)."""

from __future__ import annotations

from click.testing import CliRunner

from onnxcam.cli.main import cli


def run(args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.exception is None or isinstance(result.exception, SystemExit)
