"""``onnxcam cache``: where the rewritten models are cached, how much they take, and emptying it."""

from __future__ import annotations

import datetime
import os

import click

from onnxcam.cli.common import echo_json
from onnxcam.runtime.cache import DEFAULT_SIZE, cache_budget, cache_dir, cached_models, is_remembered_hash, prune


@click.command("cache", short_help="Show the cache of rewritten models, or empty it.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--clear", is_flag=True, help="Delete every cached model (they are rewritten when next needed); "
              "weights files that a running onnxcam process uses stay.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of text.")
def cache(clear: bool, as_json: bool) -> None:
    """Show the cache of rewritten models: its folder, its size limit and its entries.

    Each model is rewritten once per layer, score and onnxcam version and kept here, so the next
    run skips the rewrite. ONNXCAM_CACHE_DIR moves the folder; ONNXCAM_CACHE_SIZE (default
    2G, 0 for no cache) bounds it, the least recently used entries going first.

    \b
    Examples:
      onnxcam cache
      onnxcam cache --clear
    """
    budget = cache_budget()  # a wrong ONNXCAM_CACHE_SIZE is an error here too
    folder = cache_dir()
    removed = 0
    if clear:
        before, _ = cached_models()
        prune(0)
        removed = len(before) - len(cached_models()[0])
    entries, others = cached_models()
    weights = [stat.st_size for path, stat in others if path.suffix == ".weights"]
    digests = sum(1 for path, _ in others if is_remembered_hash(path))
    unfinished = len(others) - len(weights) - digests
    total = sum(entry.nbytes for entry in entries) + sum(weights)
    if as_json:
        echo_json({"folder": str(folder), "limit_bytes": budget, "bytes": total, "removed": removed,
                   "entries": [{"key": e.key, "bytes": e.nbytes, "layer": e.layer,
                                "last_used": _when(e.last_used)} for e in reversed(entries)],
                   "weights_files": len(weights), "weights_bytes": sum(weights), "remembered_hashes": digests,
                   "other_files": unfinished})
        return
    if clear:
        click.echo(f"Deleted {removed} cached model{'s' if removed != 1 else ''} from {folder}")
        if weights:
            click.echo(f"Kept {len(weights)} weights file{'s' if len(weights) != 1 else ''} that a running "
                       "onnxcam process still uses: run --clear again once it has ended")
    given = os.environ.get("ONNXCAM_CACHE_SIZE", "").strip()
    limit = "off (ONNXCAM_CACHE_SIZE=0)" if budget == 0 else _size(budget) + (
        f" (ONNXCAM_CACHE_SIZE={given})" if given else f" (default {DEFAULT_SIZE}; ONNXCAM_CACHE_SIZE sets it)")
    click.echo(f"Folder: {folder}")
    click.echo(f"Limit: {limit}")
    click.echo(f"Entries: {len(entries)} rewritten model{'s' if len(entries) != 1 else ''}, "
               f"{_size(total - sum(weights))}")
    for entry in reversed(entries):  # the most recently used first
        click.echo(f"  {entry.key[:12]}  {_size(entry.nbytes):>10}  last used {_when(entry.last_used)}  "
                   f"layer {entry.layer or '?'}")
    if weights:
        owners = "1 model's" if len(weights) == 1 else f"{len(weights)} models'"
        click.echo(f"Weights: {owners} weights shared by their entries, {_size(sum(weights))}")
    if digests:
        click.echo(f"Hashes: the SHA-256 of {digests} large model file{'s' if digests != 1 else ''}, "
                   "remembered until the file changes")
    if unfinished:
        click.echo(f"{unfinished} unfinished file{'s' if unfinished != 1 else ''} "
                   "(writes in progress, or interrupted ones: deleted after an hour)")


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")
