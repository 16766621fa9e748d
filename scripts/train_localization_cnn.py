"""Train the small shapes CNN on the synthetic localization data and export it to ONNX.

Usage (after ``python scripts/make_localization_set.py --out models/localization --seed 0``):
    python scripts/train_localization_cnn.py --data models/localization --out models/shapes_cnn.onnx

Needs torch (training time only; onnxcam itself never imports it). On two idle CPU cores it
takes about four minutes (much longer on a shared, loaded machine). The training images are drawn on the fly from the same generator as the
evaluation set (``scripts/make_localization_set.py``, split 1), with a held-out validation split
(split 2) drawn the same way; the evaluation accuracy is measured on the committed PNG files.

The network: five convolution blocks (3x3 convolutions with batch norm and ReLU; the first with
stride 2, 2x2 max pooling after the second and third) bring 96x96 down to 12x12, then global
average pooling and one linear layer: the classic CAM architecture, so Grad-CAM at the last block
equals CAM up to a constant. ``--report-only`` prints CAM localization and faithfulness metrics
of an exported file (see models/localization/README.md). Batch norm
is folded into the convolutions by the exporter. The ONNX file: opset 17, input ``input``
[N, 3, 96, 96] float32 in [0, 1] (RGB / 255), output ``logits`` [N, 5], metadata
``onnxcam.preprocess = "unit"`` and ``onnxcam.labels`` (the class names as a JSON list). The
exported model is checked against torch in onnxruntime (max |difference| of the logits <= 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # onnxcam.metrics, from this checkout


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_localization_set", HERE / "make_localization_set.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_localization_set"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def conv_block(cin: int, cout: int, i: int, stride: int = 1) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{i}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)),
        (f"bn{i}", nn.BatchNorm2d(cout)),
        (f"relu{i}", nn.ReLU()),
    ]


class ShapesCNN(nn.Module):
    """96x96 -> 48 (stride 2) -> 24 -> 12 (two convolutions at 12x12) -> global average pool
    -> linear."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        layers += conv_block(3, 16, 1, stride=2)
        layers += conv_block(16, 32, 2) + [("pool2", nn.MaxPool2d(2))]
        layers += conv_block(32, 48, 3) + [("pool3", nn.MaxPool2d(2))]
        layers += conv_block(48, 64, 4)
        layers += conv_block(64, 64, 5)  # the target layer: relu5, 64 x 12 x 12
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]: the "unit" preprocessing."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0)


def draw_split(seed: int, split: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    imgs = np.empty((count, gen.SIZE, gen.SIZE, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        imgs[i], labels[i], _ = gen.random_sample(seed, split, i)
    return imgs, labels


def load_eval(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    imgs = np.stack([np.asarray(Image.open(data / e["image"]).convert("RGB")) for e in manifest["images"]])
    labels = np.array([e["label"] for e in manifest["images"]], dtype=np.int64)
    multi = np.array([len(e["boxes"]) > 1 for e in manifest["images"]])
    return imgs, labels, multi, manifest["classes"]


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip / 90-degree rotation per batch: every class is invariant to them."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=g)):
        x = torch.flip(x, dims=(3,))
    return x


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


# ----------------------------------------------------------------------------------------------
# CAM localization report: a check that the data set and the model make sense for CAM methods.
# Computed from the exported ONNX file with onnxruntime and NumPy (no torch): for this
# architecture (global average pooling + one linear layer), Grad-CAM at the last block is
# CAM = ReLU(sum_k W[c, k] A_k), up to the positive constant 1 / (h * w).


def _bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres (align_corners=False), maps (N, h, w)."""
    n, h, w = maps.shape

    def axis(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis(height, h)
    c0, c1, fc = axis(width, w)
    rows = maps[:, r0, :] * (1 - fr)[None, :, None] + maps[:, r1, :] * fr[None, :, None]
    return rows[:, :, c0] * (1 - fc)[None, None, :] + rows[:, :, c1] * fc[None, None, :]


def _normalise(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.divide(maps - lo, span, out=np.zeros_like(maps), where=span > 0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cam_report(onnx_path: Path, data: Path) -> list[str]:
    """CAM localization and faithfulness metrics of the exported model on the evaluation set."""
    from onnx import helper, numpy_helper

    from onnxcam.metrics import (
        deletion_insertion,
        energy_pointing_game,
        explanation_map_scores,
        instance_coverage,
        load_manifest,
        pointing_game,
    )

    proto = onnx.load(str(onnx_path))
    gap = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    w = weights[gemm.input[1]]  # (classes, K): transB = 1
    act = gap.input[0]
    proto.graph.output.append(helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    s = load_manifest(data)
    x = np.stack([np.asarray(Image.open(i.image).convert("RGB")) for i in s.items]).astype(np.float32)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2) / 255.0)
    labels = np.array([i.label for i in s.items])
    boxes = [i.boxes for i in s.items]
    multi = np.array([len(b) > 1 for b in boxes])
    logits, a = sess.run(["logits", act], {"input": x})
    cam = np.maximum(np.einsum("nk,nkhw->nhw", w[labels], a), 0)
    maps = _normalise(_bilinear(cam.astype(np.float64), x.shape[2], x.shape[3]))
    yy, xx = np.mgrid[0 : x.shape[2], 0 : x.shape[3]] + 0.5
    centre = np.exp(-((yy - x.shape[2] / 2) ** 2 + (xx - x.shape[3] / 2) ** 2) / (2 * (x.shape[2] / 4) ** 2))
    centre = np.broadcast_to(centre, maps.shape)

    def predict(batch: np.ndarray) -> np.ndarray:
        return _softmax(sess.run(["logits"], {"input": batch})[0].astype(np.float64))

    lines = []
    for name, m in (("CAM (= Grad-CAM at relu5)", maps), ("centre Gaussian baseline", centre)):
        pg15 = pointing_game(m, boxes, tolerance=15)
        pg0 = pointing_game(m, boxes, tolerance=0)
        pg0s = pointing_game(m[~multi], [b for b, k in zip(boxes, multi) if not k], tolerance=0)
        ebpg = energy_pointing_game(m, boxes)
        cov = instance_coverage(m, boxes, threshold=0.5)
        scores = explanation_map_scores(predict, x, m, labels)
        di = deletion_insertion(predict, x, m, labels, steps=32)
        dblur = deletion_insertion(predict, x, m, labels, steps=32, deletion_baseline="blur", which="deletion")
        lines.append(
            f"| {name} | {pg15.accuracy:.3f} | {pg0.accuracy:.3f} | {pg0s.accuracy:.3f} | {ebpg.mean:.3f} "
            f"| {cov.share:.3f} | {scores.average_drop:.1f} | {scores.increase_in_confidence:.1f} "
            f"| {di.deletion_auc:.3f} | {dblur.deletion_auc:.3f} | {di.insertion_auc:.3f} |"
        )
    header = [
        "| maps (class = label) | pointing game, 15 px | pointing game, 0 px | 0 px, one instance "
        "| energy pointing game | instance coverage (0.5, several instances) | Average Drop % "
        "| Increase in Confidence % | deletion AUC (zeros) | deletion AUC (blur 5) | insertion AUC (blur 5) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return header + lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("models/localization"))
    ap.add_argument("--out", type=Path, default=Path("models/shapes_cnn.onnx"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=5000, help="training images drawn (split 1)")
    ap.add_argument("--val", type=int, default=1000, help="validation images drawn (split 2)")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="only print the CAM report of --out")
    args = ap.parse_args()
    if args.report_only:
        print("\n".join(cam_report(args.out, args.data)))
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_x, train_y = draw_split(args.seed, gen.SPLIT_TRAIN, args.train)
    val_x, val_y = draw_split(args.seed, gen.SPLIT_VAL, args.val)
    eval_x, eval_y, eval_multi, classes = load_eval(args.data)
    if classes != gen.CLASSES:
        raise SystemExit(f"{args.data}: classes {classes} differ from the generator's {gen.CLASSES}")
    print(f"drew {args.train} training and {args.val} validation images in {time.time() - t0:.1f} s")
    xt, yt = to_tensor(train_x), torch.from_numpy(train_y)
    xv, xe = to_tensor(val_x), to_tensor(eval_x)

    model = ShapesCNN(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-args.train // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        t1 = time.time()
        perm = torch.randperm(args.train, generator=g)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch : (b + 1) * args.batch]
            x = dihedral(xt[idx], g)
            loss = F.cross_entropy(model(x), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.shape[0]
        val_acc = float((predict_logits(model, xv).argmax(1).numpy() == val_y).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / args.train:.4f}, "
              f"validation accuracy {val_acc:.4f} ({time.time() - t1:.1f} s)", flush=True)

    model.eval()
    logits_eval = predict_logits(model, xe).numpy()
    pred = logits_eval.argmax(1)
    acc = float((pred == eval_y).mean())
    acc_single = float((pred[~eval_multi] == eval_y[~eval_multi]).mean())
    acc_multi = float((pred[eval_multi] == eval_y[eval_multi]).mean())
    val_acc = float((predict_logits(model, xv).argmax(1).numpy() == val_y).mean())

    # Export (legacy TorchScript exporter: plain Conv/Relu/MaxPool/GlobalAveragePool/Flatten/Gemm).
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, gen.SIZE, gen.SIZE),),
        str(args.out),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=True,
    )
    proto = onnx.load(str(args.out))
    del proto.metadata_props[:]
    for key, value in (
        ("onnxcam.preprocess", "unit"),
        ("onnxcam.labels", json.dumps(classes)),
        ("onnxcam.source", "scripts/train_localization_cnn.py (synthetic shapes, models/localization)"),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Small CAM-style CNN (GAP + linear) for the synthetic shapes localization set."
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(args.out))

    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate(
        [sess.run(["logits"], {"input": xe[i : i + 32].numpy()})[0] for i in range(0, xe.shape[0], 32)]
    )
    diff = float(np.abs(ort_logits - logits_eval).max())
    ort_acc = float((ort_logits.argmax(1) == eval_y).mean())
    print(f"onnxruntime vs torch: max |logit difference| = {diff:.2e}; onnxruntime eval accuracy {ort_acc:.4f}")
    if diff > 1e-4:
        raise SystemExit(f"exported model differs from torch by {diff:.2e} > 1e-4")
    size = args.out.stat().st_size
    print(f"validation accuracy (split 2, {args.val} images): {val_acc:.4f}")
    print(f"eval accuracy ({args.data}, {len(eval_y)} images): {acc:.4f} "
          f"(one instance: {acc_single:.4f}, several: {acc_multi:.4f})")
    print(f"wrote {args.out} ({size / 1e3:.0f} kB) in {time.time() - t0:.0f} s")
    print("\n".join(cam_report(args.out, args.data)))


if __name__ == "__main__":
    main()
