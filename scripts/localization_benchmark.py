"""Grad-CAM vs Grad-CAM++ vs Smooth Grad-CAM++ on the bundled localization set.

Usage (from the repository root):
    python scripts/localization_benchmark.py
    python scripts/localization_benchmark.py --out models/localization/RESULTS.md --samples 25 --steps 50

Scores, on the 120 images of ``models/localization`` with ``models/shapes_cnn.onnx``, for the
class each image shows: pointing game (15 px and 0 px), energy pointing game, Average Drop,
Increase in Confidence, Deletion and Insertion AUC and instance coverage on the images with two or
three instances. Everything goes through ``onnxcam.evaluation.evaluate`` (the maps at the 96x96
input, one batched session for the probabilities).

Why several layers: at the last layer (relu5, then global average pooling and one linear layer)
the gradient does not depend on the input, so Smooth Grad-CAM++ with averaged moments equals
Grad-CAM++ exactly (docs/method.md). The noise only matters at an EARLIER layer, where the path to
the score is non-linear (relu4 -> conv5 -> relu5 -> pool -> linear), or with the "maps" averaging
variant. Both are in the table, plus a map-free reference (a centred Gaussian) and a second noise
seed for Smooth Grad-CAM++, and paired bootstrap intervals for Smooth Grad-CAM++ minus
Grad-CAM++ at the same layer.

The Markdown report is rewritten except for the text between ``<!-- commentary -->`` and
``<!-- /commentary -->``, which is kept (it is written by a person against these numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's onnxcam

from onnxcam import Explainer  # noqa: E402
from onnxcam.atomic import atomic_write_bytes  # noqa: E402
from onnxcam.evaluation import MethodSpec, Predictor, evaluate, load_dataset  # noqa: E402
from onnxcam.metrics import (deletion_insertion, energy_pointing_game, explanation_map_scores,  # noqa: E402
                             instance_coverage, pointing_game)

LAST = "/features/relu5/Relu_output_0"
EARLY = "/features/relu4/Relu_output_0"
EARLIER = "/features/relu3/Relu_output_0"
START, END = "<!-- commentary -->", "<!-- /commentary -->"

COLUMNS = [
    ("pointing_15", "pointing 15 px", "{:.3f}", "higher"),
    ("pointing_0", "pointing 0 px", "{:.3f}", "higher"),
    ("energy_pointing_game", "energy pointing", "{:.3f}", "higher"),
    ("average_drop", "Average Drop %", "{:.1f}", "lower"),
    ("increase_in_confidence", "Incr. in Conf. %", "{:.1f}", "higher"),
    ("deletion_auc", "deletion AUC", "{:.3f}", "lower"),
    ("insertion_auc", "insertion AUC", "{:.3f}", "higher"),
    ("instance_coverage", "instances covered", "{:.3f}", "higher"),
]


def short(layer: str) -> str:
    return layer.strip("/").split("/")[-2] if layer.count("/") >= 2 else layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/shapes_cnn.onnx")
    parser.add_argument("--data", default="models/localization")
    parser.add_argument("--out", default="models/localization/RESULTS.md")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--noise-level", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=15.0)
    parser.add_argument("--limit", type=int, default=None, help="first N images only (for a quick try)")
    parser.add_argument("--no-earlier", action="store_true", help="skip the relu3 rows")
    args = parser.parse_args()
    started = time.perf_counter()
    os.chdir(ROOT)

    explainer = Explainer(args.model, device="cpu")
    dataset = load_dataset(args.data, labels=explainer.labels, num_classes=explainer.num_classes).limit(args.limit)
    specs = []
    layers = [LAST, EARLY] + ([] if args.no_earlier else [EARLIER])
    for layer in layers:
        specs += [MethodSpec("gradcam", (), layer), MethodSpec("gradcampp", (), layer),
                  MethodSpec("smoothgradcampp", (), layer),
                  MethodSpec("smoothgradcampp", (("averaging", "maps"),), layer)]
    common = dict(samples=args.samples, noise_level=args.noise_level, steps=args.steps, tolerance=args.tolerance)
    print(f"{dataset.describe()}; {len(specs)} methods", flush=True)
    result = evaluate(explainer, dataset, specs, seed=args.seed, **common, progress=progress)
    print(flush=True)
    # a second noise seed for the Smooth Grad-CAM++ rows whose maps depend on the noise
    noisy = [s for s in specs if s.method == "smoothgradcampp" and (s.layer != LAST or s.options)]
    reseeded = evaluate(explainer, dataset, noisy, seed=args.seed + 1, **common)
    print("second seed done", flush=True)
    baseline = centre_baseline(explainer, dataset, args)
    elapsed = time.perf_counter() - started

    rows = [row_values(row, result.samples, args.tolerance) for row in result.rows]
    seed_rows = [row_values(row, reseeded.samples, args.tolerance) for row in reseeded.rows]
    paired = paired_differences(result, specs)
    document = {
        "command": command_line(), "machine": machine(), "elapsed_s": round(elapsed, 1),
        "settings": result.settings, "summary": result.summary, "rows": rows, "second_seed_rows": seed_rows,
        "baseline": baseline, "paired": paired, "timings": result.timings,
    }
    full = dict(document, samples=result.samples, second_seed_samples=reseeded.samples)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(full, indent=2).encode() + b"\n")
    text = report(document, args, previous_commentary(Path(args.out)))
    atomic_write_bytes(args.out, text.encode("utf-8"))
    print(text)
    print(f"wrote {args.out} in {elapsed:.0f} s")


def progress(stage: str, done: int, total: int) -> None:
    if done == total:
        print(f"{stage}: {total}/{total}", flush=True)


def row_values(row: dict, samples: list[dict], tolerance: float) -> dict:
    name = row["method"]
    distances = np.array([s["methods"][name].get("pointing_distance", np.nan) for s in samples
                          if "pointing_distance" in s["methods"][name]], dtype=np.float64)
    values = {key: row.get(key) for key, *_ in COLUMNS}
    values["pointing_15"] = float(np.mean(np.nan_to_num(distances, nan=np.inf) <= tolerance))
    values["pointing_0"] = float(np.mean(np.nan_to_num(distances, nan=np.inf) <= 0))
    values.update(method=name, title=row["title"], layer=short(row["layer"]), flat_maps=row["flat_maps"],
                  skipped=row["noisy_passes_skipped"], seed=None)
    return values


def centre_baseline(explainer, dataset, args) -> dict:
    """The same metrics for a map that ignores the image: a centred Gaussian (std 24 px)."""
    predictor = Predictor(explainer)
    x = explainer.preprocess([s.image for s in dataset.samples])
    h, w = x.shape[2:]
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2) / (2 * 24.0 ** 2)))
    blob = (blob - blob.min()) / (blob.max() - blob.min())
    maps = np.repeat(blob[None].astype(np.float32), len(x), axis=0)
    classes = np.array([s.label for s in dataset.samples])
    regions = [s.regions_at((h, w)) for s in dataset.samples]
    scores = explanation_map_scores(predictor, x, maps, classes, batch_size=predictor.batch_size)
    curves = deletion_insertion(predictor, x, maps, classes, steps=args.steps, batch_size=predictor.batch_size)
    coverage = instance_coverage(maps, regions, threshold=0.5, min_instances=2)
    return {"title": "centre Gaussian (no model)", "layer": "-",
            "pointing_15": pointing_game(maps, regions, tolerance=args.tolerance).accuracy,
            "pointing_0": pointing_game(maps, regions, tolerance=0).accuracy,
            "energy_pointing_game": energy_pointing_game(maps, regions).mean,
            "average_drop": scores.average_drop, "increase_in_confidence": scores.increase_in_confidence,
            "deletion_auc": curves.deletion_auc, "insertion_auc": curves.insertion_auc,
            "instance_coverage": coverage.share}


def paired_differences(result, specs, resamples: int = 2000) -> list[dict]:
    """Per image, at the same layer: Smooth Grad-CAM++ (both variants) minus Grad-CAM++, and
    Grad-CAM++ minus Grad-CAM for scale; the mean with a 95% bootstrap interval (images resampled
    with replacement, seed 0)."""
    rng = np.random.default_rng(0)
    samples = result.samples
    out = []
    metrics = [("energy", "energy pointing", "higher"), ("drop", "Average Drop %", "lower"),
               ("deletion_auc", "deletion AUC", "lower"), ("insertion_auc", "insertion AUC", "higher"),
               ("covered_share", "share of instances covered (multi)", "higher")]
    pairs_to_compare = []
    for spec in specs:
        if spec.method == "gradcampp":  # Grad-CAM++ minus Grad-CAM, for scale
            pairs_to_compare.append((spec, MethodSpec("gradcam", (), spec.layer)))
        elif spec.method == "smoothgradcampp":
            pairs_to_compare.append((spec, MethodSpec("gradcampp", (), spec.layer)))
    for spec, reference_spec in pairs_to_compare:
        reference = reference_spec.name
        entry = {"method": spec.name, "title": f"{spec.title} minus {reference_spec.title}",
                 "layer": short(spec.layer), "metrics": []}
        for key, label, better in metrics:
            if key == "covered_share":
                pairs = [(s["methods"][spec.name]["covered"] / s["instances"],
                          s["methods"][reference]["covered"] / s["instances"])
                         for s in samples if s["instances"] >= 2]
            else:
                pairs = [(s["methods"][spec.name][key], s["methods"][reference][key]) for s in samples
                         if key in s["methods"][spec.name]]
            diff = np.array([a - b for a, b in pairs], dtype=np.float64)
            if key == "drop":
                diff *= 100.0
            if diff.size == 0:
                continue
            means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
            low, high = np.percentile(means, [2.5, 97.5])
            entry["metrics"].append({"metric": label, "better": better, "mean": float(diff.mean()),
                                     "low": float(low), "high": float(high), "images": int(diff.size),
                                     "identical": bool(np.all(diff == 0))})
        out.append(entry)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores available, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, NumPy {np.__version__}, onnxruntime {onnxruntime.__version__} "
            "(CPUExecutionProvider)")


def command_line() -> str:
    """The command, less the options that only say where to write (they do not change the numbers)."""
    args, kept, skip = sys.argv[1:], [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--json", "--out"):
            skip = True
            continue
        if arg.startswith(("--json=", "--out=")):
            continue
        kept.append(arg)
    return "python " + " ".join(shlex.quote(a) for a in ["scripts/localization_benchmark.py", *kept])


def previous_commentary(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if START in text and END in text:
        return text[text.index(START) + len(START):text.index(END)].strip("\n")
    return None


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else spec.format(value)


def best_marks(rows: list[dict]) -> dict[str, set[int]]:
    marks = {}
    for key, _, spec, better in COLUMNS:
        values = [(spec.format(r[key]), i) for i, r in enumerate(rows) if r.get(key) is not None]
        if not values:
            continue
        numbers = [float(v) for v, _ in values]
        target = min(numbers) if better == "lower" else max(numbers)
        marks[key] = {i for (v, i) in values if float(v) == target}
    return marks


def report(doc: dict, args, commentary: str | None) -> str:
    s = doc["settings"]
    rows = doc["rows"]
    lines = [
        "# Localization and faithfulness: Grad-CAM, Grad-CAM++, Smooth Grad-CAM++",
        "",
        "Generated by `scripts/localization_benchmark.py` (tables) on "
        f"{dt.date.today().isoformat()}; regenerate with",
        "",
        f"    {doc['command']}",
        "",
        f"- Machine: {doc['machine']}. Wall time {doc['elapsed_s']:.0f} s (a shared, loaded machine).",
        f"- Data: {doc['summary']['images']} images of `models/localization` (96x96, 5 classes), "
        f"{doc['summary']['multi_instance']} with two or three instances of their class; model "
        f"`models/shapes_cnn.onnx`, accuracy {doc['summary']['accuracy']:.3f}. Each map explains the "
        "labelled class.",
        f"- Maps at the 96x96 input (bilinear upsampling, min-max normalised). Smooth Grad-CAM++: "
        f"{s['samples']} samples, noise level {s['noise_level']}, seed {s['seed']}, numerator D2. "
        f"Deletion to {s['deletion_baseline']} (black), insertion from the image blurred with sigma "
        f"{s['blur_sigma']} px, {s['steps']} steps. Pointing game: hit when the map's maximum is within "
        f"{s['tolerance_px']:g} px (or 0 px) of a box. Instances covered: a pixel inside the instance "
        f"reaches {s['coverage_threshold']} of the map's maximum, over the multi-instance images.",
        "- Layers: `relu5` is the last block (then global average pooling and one linear layer: a "
        "linear path, so the gradient is the same for every input); `relu4` (12x12) and `relu3` "
        "(24x24) are earlier, with a non-linear path to the score.",
        "",
        "## Results",
        "",
    ]
    header = ["method", "layer", *[label for _, label, _, _ in COLUMNS]]
    table_rows = rows + [doc["baseline"]]
    marks = best_marks(rows)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|")
    for i, row in enumerate(table_rows):
        cells = [row["title"] + (" *(= Grad-CAM++, noisy passes skipped)*" if row.get("skipped") else ""),
                 row["layer"]]
        for key, _, spec, _ in COLUMNS:
            text = fmt(row.get(key), spec)
            cells.append(f"**{text}**" if i < len(rows) and i in marks.get(key, ()) else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bold: the best value among the CAM rows (ties all bold). Higher is better except "
              "Average Drop and deletion AUC. The last row is a map that ignores the image.", ""]
    lines += ["### Smooth Grad-CAM++ with another noise seed", "",
              f"The same rows with seed {s['seed'] + 1} (how much of a difference is noise):", ""]
    lines.append("| method | layer | " + " | ".join(label for _, label, _, _ in COLUMNS) + " |")
    lines.append("|---|---|" + "|".join(["---:"] * len(COLUMNS)) + "|")
    for row in doc["second_seed_rows"]:
        lines.append(f"| {row['title']} | {row['layer']} | "
                     + " | ".join(fmt(row.get(k), spec) for k, _, spec, _ in COLUMNS) + " |")
    lines += ["", "### Paired differences at the same layer, per image", "",
              "Mean difference over the images with a 95% bootstrap interval (2000 resamples of the "
              "images). An interval that contains 0 is no evidence of a difference.", "",
              "| difference | layer | metric | better | mean difference | 95% interval | images |",
              "|---|---|---|---|---:|---|---:|"]
    for entry in doc["paired"]:
        for m in entry["metrics"]:
            interval = "0 on every image" if m["identical"] else f"[{m['low']:+.4f}, {m['high']:+.4f}]"
            lines.append(f"| {entry['title']} | {entry['layer']} | {m['metric']} | {m['better']} | "
                         f"{m['mean']:+.4f} | {interval} | {m['images']} |")
    lines += ["", "## What the numbers show", "", START]
    lines.append(commentary if commentary is not None else "(commentary to be written against these numbers)")
    lines += [END, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
