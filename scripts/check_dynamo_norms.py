"""The normalizations and activations torch's dynamo exporter writes as single ONNX operators in
newer opsets -- Mish (opset 18), GroupNormalization (21), RMSNormalization (23) -- through
onnxcam's rewrite, against ``torch.autograd`` of the same module. Needs torch and onnxscript, so
it is a script, not a test::

    .cache/dvenv/bin/python scripts/check_dynamo_norms.py

Prints, per opset, the operators the export holds and the relative error of the gradient at the
body's output; exits 1 if any is over ``--tolerance``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, SEED, build_gradient_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opsets", type=int, nargs="+", default=[18, 21, 23])
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.Mish())
            self.head = nn.Sequential(nn.Conv2d(8, 12, 3, 1, 1), nn.GroupNorm(3, 12), nn.SiLU(),
                                      nn.RMSNorm([12, 16, 16]), nn.Mish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(12, 5))

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # scales and shifts away from their 1 and 0
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.RMSNorm)):
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, nn.GroupNorm):
                module.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    activation = model.body(x).detach().requires_grad_(True)
    logits = model.head(activation)
    seed = torch.randn(logits.shape)
    (expected,) = torch.autograd.grad((logits * seed).sum(), activation)
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for opset in args.opsets:
            path = Path(folder) / f"norms_{opset}.onnx"
            torch.onnx.export(model, (x[:1],), dynamo=True, opset_version=opset,
                              dynamic_shapes={"x": {0: torch.export.Dim("N")}}).save(str(path))
            ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
            layer = [c.tensor for c in build_gradient_model(path).candidates
                     if tuple(c.shape[1:]) == tuple(activation.shape[1:])][-1]
            gm = build_gradient_model(path, layer=layer)
            session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
            a, g = session.run([ACTIVATION, GRADIENT], {gm.input_name: x.numpy(), SEED: seed.numpy()})
            same = np.allclose(a, activation.detach().numpy(), atol=1e-5)
            error = float(np.abs(g - expected.numpy()).max() / np.abs(expected.numpy()).max()) if same else float("inf")
            held = {op: ops[op] for op in ("Mish", "GroupNormalization", "RMSNormalization") if ops[op]}
            print(f"opset {opset}: {held}, layer {layer}, gradient relative error {error:.1e}")
            worst = max(worst, error)
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
