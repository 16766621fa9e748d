"""The nine ONNX-zoo classifiers shipped in the onnx wheel, with seeded random weights.

Their own weights are all ConstantOfShape(0.02): every logit equal, every gradient degenerate
(onnx-gradients.md), so no comparison made on them means anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO_MODELS = sorted(p.name for p in ZOO_DIR.glob("*.onnx"))


def _constant_values(graph) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def randomized(name: str, seed: int = 0) -> onnx.ModelProto:
    """The zoo model with each ConstantOfShape weight replaced by a seeded random initializer:
    He-scaled for weight tensors, positive around 1 for per-channel vectors (BN scale/var)."""
    model = onnx.load(ZOO_DIR / name)
    rng = np.random.default_rng(seed)
    graph = model.graph
    shapes = _constant_values(graph)
    kept = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape = [int(d) for d in shapes[node.input[0]]]
        if len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        else:
            value = rng.uniform(0.5, 1.5, shape)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    model.ir_version = max(model.ir_version, 4)  # initializers need not be listed as inputs
    return model
