"""Generate the synthetic localization data set (shapes on cluttered backgrounds).

Usage:
    python scripts/make_localization_set.py --out models/localization --seed 0

Every image is 96x96 RGB and shows one, or two to three, instances of ONE shape class (circle,
square, triangle, cross, ring) in random colours, sizes and rotations, on a cluttered background:
a smooth random colour field, random thin lines and open polylines, small dots, and pixel noise.
None of the clutter is a filled shape, so it belongs to no class. The ground truth is the tight
box of each instance's drawn pixels, ``[x0, y0, x1, y1]`` with x1/y1 exclusive (the slice
``[y0:y1, x0:x1]``); instances never overlap.

Everything is deterministic: each image is drawn with its own NumPy generator seeded with
``(seed, split, index)`` (and Pillow's non-antialiased drawing). The evaluation split is written
as PNG files with ``manifest.json`` and ``labels.txt``; the training split is never written: the
training script (``scripts/train_localization_cnn.py``) draws it on the fly with
:func:`make_sample` from the same generator, with another ``split`` number.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "cross", "ring"]
SIZE = 96
SPLIT_EVAL = 0
SPLIT_TRAIN = 1
SPLIT_VAL = 2  # a larger held-out split, drawn like the training one, to measure accuracy

# Object sizes (bounding square side, pixels) for one and for several instances.
SINGLE_SIZE = (24, 42)
MULTI_SIZE = (16, 28)
GAP = 3  # minimum gap between instance boxes


def sample_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the split sizes."""
    return np.random.default_rng([seed, split, index])


def _background(rng: np.random.Generator) -> tuple[np.ndarray, Image.Image]:
    """A smooth colour field with thin-line, polyline and dot clutter."""
    grid = rng.uniform(30, 220, size=(4, 4, 3)).astype(np.uint8)
    field = Image.fromarray(grid, "RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    img = field.copy()
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):  # straight lines
        x0, y0, x1, y1 = rng.uniform(-10, SIZE + 10, size=4)
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 4))):  # open scribbles
        n = int(rng.integers(3, 6))
        start = rng.uniform(0, SIZE, size=2)
        pts = [tuple(start)]
        for _ in range(n):
            start = np.clip(start + rng.normal(0, 12, size=2), 0, SIZE)
            pts.append(tuple(start))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line(pts, fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 12))):  # small dots (much smaller than any object)
        cx, cy = rng.uniform(0, SIZE, size=2)
        r = float(rng.uniform(0.8, 2.2))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    return np.asarray(field, dtype=np.float32), img


def _rotated(points: list[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


def _shape_mask(label: int, cx: float, cy: float, size: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of one instance centred at (cx, cy) within a square of side size."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(mask)
    r = size / 2
    angle = float(rng.uniform(0, 2 * math.pi))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * float(rng.uniform(0.45, 0.6))
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "square":
        h = r * float(rng.uniform(0.68, 0.8))  # half side: the area matches a circle's
        d.polygon(_rotated([(-h, -h), (h, -h), (h, h), (-h, h)], angle, cx, cy), fill=255)
    elif name == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        d.polygon(_rotated(pts, angle, cx, cy), fill=255)
    elif name == "cross":
        a = r * 0.95
        t = r * float(rng.uniform(0.28, 0.38))
        pts = [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
        d.polygon(_rotated(pts, angle, cx, cy), fill=255)
    else:  # pragma: no cover
        raise ValueError(label)
    return np.asarray(mask) > 127


def _box_of(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _object_colour(rng: np.random.Generator, local_bg: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background around the object."""
    best, best_d = None, -1.0
    for _ in range(50):
        col = rng.integers(0, 256, size=3).astype(np.float32)
        dist = float(np.linalg.norm(col - local_bg))
        if dist >= 110:
            return col
        if dist > best_d:
            best, best_d = col, dist
    return best


def make_sample(rng: np.random.Generator, label: int, n_instances: int,
                masks_out: list | None = None) -> tuple[np.ndarray, list[list[int]]]:
    """One image (SIZE, SIZE, 3) uint8 with ``n_instances`` of class ``label`` and their boxes;
    each instance's pixel mask is appended to ``masks_out`` when given (the segmenter's labels;
    the random draws are the same either way)."""
    field, img = _background(rng)
    canvas = np.asarray(img, dtype=np.float32).copy()
    lo, hi = MULTI_SIZE if n_instances > 1 else SINGLE_SIZE
    boxes: list[list[int]] = []
    masks: list[np.ndarray] = []
    attempts = 0
    while len(boxes) < n_instances:
        attempts += 1
        if attempts > 500:  # start over with fresh positions (never happens with the sizes above)
            boxes, masks, attempts = [], [], 0
        size = float(rng.uniform(lo, hi))
        r = size / 2
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
        mask = _shape_mask(label, float(cx), float(cy), size, rng)
        if not mask.any():
            continue
        box = _box_of(mask)
        if box[0] < 1 or box[1] < 1 or box[2] > SIZE - 1 or box[3] > SIZE - 1:
            continue
        if any(
            box[0] < b[2] + GAP and b[0] < box[2] + GAP and box[1] < b[3] + GAP and b[1] < box[3] + GAP
            for b in boxes
        ):
            continue
        boxes.append(box)
        masks.append(mask)
    for mask in masks:
        local = field[mask].mean(axis=0)
        col = _object_colour(rng, local)
        shade = rng.uniform(0.85, 1.0, size=(SIZE, SIZE, 1)).astype(np.float32)  # mild texture
        canvas = np.where(mask[:, :, None], np.clip(col[None, None, :] * shade, 0, 255), canvas)
    canvas = canvas + rng.normal(0, 3.0, size=canvas.shape).astype(np.float32)
    if masks_out is not None:
        masks_out.extend(masks)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes


def eval_plan(count: int) -> list[tuple[int, int]]:
    """(label, n_instances) of each evaluation image: classes in turn; even indices one instance,
    odd indices two or three (alternating), so each class has as many single as multiple images."""
    plan = []
    for i in range(count):
        label = (i // 2) % len(CLASSES)
        n = 1 if i % 2 == 0 else 2 + (i // 2 // len(CLASSES)) % 2
        plan.append((label, n))
    return plan


def random_sample(
    seed: int, split: int, index: int, multi_fraction: float = 0.4, masks_out: list | None = None
) -> tuple[np.ndarray, int, list[list[int]]]:
    """Image ``index`` of a drawn split (training, validation): label and instance count (one,
    or two to three with probability ``multi_fraction``) drawn from its own generator."""
    rng = sample_rng(seed, split, index)
    label = int(rng.integers(len(CLASSES)))
    n = 1 if rng.uniform() >= multi_fraction else int(rng.integers(2, 4))
    img, boxes = make_sample(rng, label, n, masks_out)
    return img, label, boxes


def _manifest_text(manifest: dict) -> str:
    """JSON with one line per image entry (readable diffs)."""
    head = {k: v for k, v in manifest.items() if k != "images"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "images": [']
    lines.append(",\n".join("  " + json.dumps(e) for e in manifest["images"]))
    lines.append(" ]\n}\n")
    return "\n".join(lines)


def write_eval_set(out: Path, seed: int, count: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (label, n) in enumerate(eval_plan(count)):
        img, boxes = make_sample(sample_rng(seed, SPLIT_EVAL, i), label, n)
        name = f"{i + 1:04d}.png"
        Image.fromarray(img, "RGB").save(out / name, optimize=True)
        entries.append({"image": name, "label": label, "label_name": CLASSES[label], "boxes": boxes})
    manifest = {
        "classes": CLASSES,
        "image_size": [SIZE, SIZE],
        "box_format": "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive (the slice [y0:y1, x0:x1])",
        "generator": f"scripts/make_localization_set.py --seed {seed} --count {count}",
        "images": entries,
    }
    (out / "manifest.json").write_text(_manifest_text(manifest), encoding="utf-8")
    (out / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/localization"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=120, help="number of evaluation images")
    args = ap.parse_args()
    manifest = write_eval_set(args.out, args.seed, args.count)
    n_multi = sum(len(e["boxes"]) > 1 for e in manifest["images"])
    total = sum(f.stat().st_size for f in args.out.glob("*.png"))
    print(f"wrote {len(manifest['images'])} images ({n_multi} with several instances), "
          f"{total / 1e6:.2f} MB of PNG, to {args.out}")


if __name__ == "__main__":
    main()
