"""Train a small segmentation network on the synthetic shapes and export it to ONNX.

Usage:
    python scripts/train_shapes_segmenter.py --out models/shapes_segmenter.onnx

Needs torch (training time only). The images and their pixel labels are drawn on the fly from the
generator of the localization set (``scripts/make_localization_set.py``: split 1 to train, split 2
to validate), each shape's pixels labelled with its class, everything else ``background``.

The network is a small fully convolutional one: six 3x3 convolution blocks with batch norm and
ReLU, three of them with stride 2, bring 96x96 down to 12x12 (``features``, 64 channels); a 1x1
convolution gives the 6 class scores there, upsampled bilinearly to the input's own size
(``F.interpolate(size=x.shape[-2:])``, as torchvision's segmentation models do). The ONNX file:
opset 17, input ``input`` [N, 3, 96, 96] float32 in [0, 1] (RGB / 255), output ``logits``
[N, 6, 96, 96], metadata ``onnxcam.preprocess = "unit"`` and ``onnxcam.labels`` (``background``
first). The exported model is checked against torch in onnxruntime; the script prints the
validation pixel accuracy and the intersection over union of every class.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import make_localization_set as gen  # scripts/ is on sys.path when run as python scripts/NAME.py

LABELS = ["background", *gen.CLASSES]


class ShapesSegmenter(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        for i, (cin, cout, stride) in enumerate([(3, 16, 2), (16, 32, 1), (32, 32, 2), (32, 48, 1),
                                                 (48, 48, 2), (48, 64, 1)], start=1):
            layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, stride, 1, bias=False)),
                       (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU())]
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Conv2d(64, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.features(x))
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def draw_split(seed: int, split: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [count, 3, 96, 96] in [0, 1], pixel labels [count, 96, 96]: 0 background)."""
    images = np.empty((count, gen.SIZE, gen.SIZE, 3), dtype=np.uint8)
    labels = np.zeros((count, gen.SIZE, gen.SIZE), dtype=np.int64)
    for i in range(count):
        masks: list[np.ndarray] = []
        images[i], label, _ = gen.random_sample(seed, split, i, masks_out=masks)
        for mask in masks:
            labels[i][mask] = label + 1
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0)
    return x, torch.from_numpy(labels)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def ious(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> list[float]:
    return [float(((predicted == c) & (truth == c)).sum()) / max(float(((predicted == c) | (truth == c)).sum()), 1.0)
            for c in range(classes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/shapes_segmenter.onnx"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    xt, yt = draw_split(args.seed, gen.SPLIT_TRAIN, args.train)
    xv, yv = draw_split(args.seed, gen.SPLIT_VAL, args.val)
    print(f"drew {args.train} training and {args.val} validation images in {time.time() - t0:.1f} s", flush=True)

    model = ShapesSegmenter(len(LABELS))
    weights = torch.ones(len(LABELS))
    weights[0] = 0.3  # the background is most of every image
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = -(-args.train // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        t1 = time.time()
        order = torch.randperm(args.train, generator=g)
        total = 0.0
        for b in range(steps):
            idx = order[b * args.batch:(b + 1) * args.batch]
            k = int(torch.randint(0, 4, (1,), generator=g))  # rotations: every class is invariant
            x, y = torch.rot90(xt[idx], k, dims=(2, 3)), torch.rot90(yt[idx], k, dims=(1, 2))
            loss = F.cross_entropy(model(x), y, weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        predicted = predict(model, xv)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / args.train:.4f}, validation pixel accuracy "
              f"{float((predicted == yv).float().mean()):.4f}, mean IoU {np.mean(ious(predicted, yv, len(LABELS))):.3f} "
              f"({time.time() - t1:.1f} s)", flush=True)

    predicted = predict(model, xv)
    per_class = ious(predicted, yv, len(LABELS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(1, 3, gen.SIZE, gen.SIZE),), str(args.out), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
    proto = onnx.load(str(args.out))
    del proto.metadata_props[:]
    for key, value in (("onnxcam.preprocess", "unit"), ("onnxcam.labels", json.dumps(LABELS)),
                       ("onnxcam.source", "scripts/train_shapes_segmenter.py (synthetic shapes)")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Small fully convolutional segmenter for the synthetic shapes (background + 5 classes)."
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(args.out))

    session = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(xv[:16]).numpy()
    got = session.run(None, {"input": xv[:16].numpy()})[0]
    difference = float(np.abs(got - want).max())
    if difference > 1e-3:
        raise SystemExit(f"the ONNX export differs from torch by {difference:.2e}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); ONNX vs torch max |difference| {difference:.1e}")
    print("validation IoU: " + ", ".join(f"{name} {iou:.3f}" for name, iou in zip(LABELS, per_class)))
    print(f"validation pixel accuracy {float((predicted == yv).float().mean()):.4f}, "
          f"mean IoU {np.mean(per_class):.3f}; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
