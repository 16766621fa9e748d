"""What the overlay's file format costs on large photos: ``onnxcam explain --image-format png``
against ``jpg``, in one process, alternating.

A photo-like test picture (smooth colour waves plus sensor-like noise, so neither format gets an
easy image) of ``--megapixels`` is written as a JPEG; then, in rounds, each format:

- encodes the picture's overlay alone (Pillow, the options onnxcam uses), and
- runs ``onnxcam explain`` on it end to end (decode, model, overlay, encode), through the
  command line's own code in this process.

Medians in seconds and the bytes written. Not a test::

    python scripts/bench_image_formats.py --megapixels 12 --rounds 5

On the 2-core CPU machine (2026-11-28, 3 rounds): the 12-megapixel overlay encoded in 0.888 s as
PNG and 0.040 s as JPEG; the whole explanation (EfficientNet-Lite0, Grad-CAM) took 1.620 s against
0.861 s and wrote 18.4 MB against 1.8 MB.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def photo_like(megapixels: float, seed: int = 0) -> Image.Image:
    """A 4:3 RGB picture of about ``megapixels`` with smooth structure and noise."""
    height = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    width = int(round(height * 4 / 3))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = np.stack([np.sin(x / 50), np.cos(y / 70), np.sin((x + y) / 90)], axis=-1) * 100 + 128
    noise = np.random.default_rng(seed).normal(0, 8, waves.shape).astype(np.float32)
    return Image.fromarray(np.clip(waves + noise, 0, 255).astype(np.uint8))


def main() -> None:
    from click.testing import CliRunner

    from onnxcam.cli.main import cli
    from onnxcam.imaging.io import IMAGE_FORMATS, save_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "efficientnet_lite0.onnx")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        picture = photo_like(args.megapixels)
        photo = work / "photo.jpg"
        picture.save(photo, quality=92)
        print(f"{picture.width}x{picture.height} photo, {photo.stat().st_size / 1e6:.1f} MB as JPEG; "
              f"model {args.model.name}")
        runner = CliRunner()
        encode = {name: [] for name in IMAGE_FORMATS}
        explain = {name: [] for name in IMAGE_FORMATS}
        written = {}
        for round_ in range(args.rounds + 1):  # round 0 warms the cache and the sessions up
            for name in IMAGE_FORMATS:
                buffer = io.BytesIO()
                start = time.perf_counter()
                picture.save(buffer, **save_options(name))
                encoded = time.perf_counter() - start
                out = work / f"out_{name}_{round_}"
                start = time.perf_counter()
                result = runner.invoke(cli, ["explain", str(args.model), str(photo), "--method", "gradcam",
                                             "--image-format", name, "--out", str(out)])
                elapsed = time.perf_counter() - start
                if result.exit_code != 0:
                    raise SystemExit(result.output)
                if round_:
                    encode[name].append(encoded)
                    explain[name].append(elapsed)
                written[name] = sum(path.stat().st_size for path in out.iterdir())
        print("| format | encode the overlay (s) | explain end to end (s) | files written (MB) |")
        print("|---|---|---|---|")
        for name in IMAGE_FORMATS:
            print(f"| {name} | {statistics.median(encode[name]):.3f} | {statistics.median(explain[name]):.3f} "
                  f"| {written[name] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
