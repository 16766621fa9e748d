"""The one ``torch.onnx.export`` call of the export scripts: the classic TorchScript exporter
(``dynamo=False``), input ``input`` and output ``logits`` with a dynamic batch axis ``N``,
constants folded, the weights inside the file."""

from __future__ import annotations

import os
from pathlib import Path


def export_classic(model, sample, opset: int, scratch: Path):
    """``model`` traced on ``sample`` as an ``onnx.ModelProto``; written to ``scratch`` first
    (the exporter writes files only) and that file removed."""
    import onnx
    import torch

    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (sample,),
                str(scratch),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                do_constant_folding=True,
                export_params=True,
            )
        return onnx.load(str(scratch))
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
