"""torchvision classifiers exported with torch's dynamo exporter: onnxcam's gradient at the
output of ``model.features`` (``layer4`` for ResNets, the NCHW view of the last stage for Swin,
the patch tokens entering the last block, on their grid, for ViT) against ``torch.autograd`` of
the same weights.

The dynamo exporter (torch >= 2.9's default) writes patterns the classic one does not: Reshape
with ``allowzero=1``, views as a Gather of fixed indices into the flattened batch of 1 (both
made batch-free by preparation), and attention reshapes that build the batch of 1 in for good. Needs torch, torchvision and onnxscript, so it is a script, not a test::

    python -m venv .cache/dvenv && .cache/dvenv/bin/pip install torch torchvision onnxscript -e .
    .cache/dvenv/bin/python scripts/check_dynamo_exports.py mobilenet_v3_small convnext_tiny
    .cache/dvenv/bin/python scripts/check_dynamo_exports.py vit_b_16 --opset 23  # ONNX's Attention

Prints, per model, where a batch of 1 is built in (or that the batch is free), the relative
error of the gradient, and, when the batch is free, how far a run of 3 inputs is from each
one's single-run gradient. Exits 1 if either is more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def check(name: str, folder: Path, tolerance: float, opset: int | None = None) -> bool:
    import onnxruntime as ort
    import torch
    import torchvision

    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, SEED, build_gradient_model

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():  # zero-initialised weights (ViT's head) would make every gradient 0
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0, 0.02)
    path = folder / f"{name}.onnx"
    extra = {"opset_version": opset} if opset else {}
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), dynamo=True, **extra).save(str(path))
    gm = build_gradient_model(path)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    features = {}
    if hasattr(model, "encoder"):  # a ViT: the tokens entering the last block, patches on their grid
        hook = model.encoder.layers[-1].register_forward_pre_hook(
            lambda module, args: features.setdefault("A", args[0]))
        side = int(round((model.seq_length - 1) ** 0.5))

        def view(t):
            return t[:, 1:].reshape(1, side, side, -1).transpose(0, 3, 1, 2)
    else:  # the last stage's output (Swin's is channels last: its NCHW view after model.norm)
        body = next(getattr(model, name) for name in ("permute", "features", "layer4") if hasattr(model, name))
        hook = body.register_forward_hook(lambda module, args, out: features.setdefault("A", out))

        def view(t):
            return t
    logits = model(x)
    hook.remove()
    activation = features["A"]
    activation.retain_grad()
    target = int(logits.argmax())
    logits[0, target].backward()
    seed = np.zeros((1, logits.shape[1]), np.float32)
    seed[0, target] = 1.0
    A, G = session.run([ACTIVATION, GRADIENT], {gm.input_name: x.numpy(), SEED: seed})
    expected_activation, expected = view(activation.detach().numpy()), view(activation.grad.numpy())
    same_layer = A.shape == expected.shape and np.allclose(A, expected_activation, atol=1e-4)
    error = float(np.abs(G - expected).max() / np.abs(expected).max()) if same_layer else float("inf")
    where = f"batch of 1 built in at {gm.batch_built_in!r}" if gm.batch_built_in else "batch free"
    line = f"{name}: layer {gm.layer}, {where}, gradient relative error {error:.1e}"
    if gm.batch_built_in is None:
        xs = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)
        seeds = np.repeat(seed, 3, axis=0)
        together = session.run([GRADIENT], {gm.input_name: xs, SEED: seeds})[0]
        alone = np.concatenate([session.run([GRADIENT], {gm.input_name: xs[i:i + 1], SEED: seeds[i:i + 1]})[0]
                                for i in range(3)])
        batch_error = float(np.abs(together - alone).max() / np.abs(alone).max())
        line += f", a run of 3 against single runs: relative difference {batch_error:.1e}"
        error = max(error, batch_error)
    print(line if same_layer else f"{name}: the layer {gm.layer} is not the body's output; not compared")
    return same_layer and error <= tolerance


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="torchvision.models names (with .features, ResNets, Swins or ViTs)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--opset", type=int, default=None,
                        help="export at this opset (23 and above write ONNX's Attention operator)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        results = [check(name, Path(folder), args.tolerance, args.opset) for name in args.models]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
