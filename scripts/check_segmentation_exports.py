"""torchvision segmentation models exported with torch's classic and dynamo exporters: onnxcam's
gradient of the top class's region score at the automatic layer against ``torch.autograd``.

FCN, DeepLabV3 (ResNet-50 and MobileNetV3 backbones) and LRASPP, ``weights=None`` with every
weight redrawn from a fixed seed (``export_checks.well_scaled``), their ``"out"`` scores only.
onnxcam reads the [N, 21, 224, 224] output as classes per pixel; the score is the top class's
logits summed over the pixels it wins (``onnxcam.explain.regions``), the same sum torch
differentiates here. These models upsample their scores to the input's own size, a Resize whose
sizes the graph computes. The comparison, the command line and the output are
``export_checks.py``'s (see ``check_torchvision_exports.py``). Needs torch, torchvision and
onnxscript::

    .cache/tvenv/bin/python scripts/check_segmentation_exports.py
    .cache/tvenv/bin/python scripts/check_segmentation_exports.py lraspp_mobilenet_v3_large --exporter classic
"""

from __future__ import annotations

import export_checks  # scripts/export_checks.py: scripts/ is on sys.path when run as python scripts/NAME.py

MODELS = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


def build(name: str):
    """The model's ``"out"`` scores as forward(input) -> [N, 21, H, W], with well-scaled weights."""
    import torch
    import torchvision

    class Scores(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
    return export_checks.well_scaled(Scores(model).eval())


SUITE = export_checks.Suite(doc=__doc__, models=MODELS, build=lambda name, exporter: build(name), width=28,
                            module_prefix="model.", batch_must_be_free=True)


def main(argv=None) -> None:
    export_checks.main(SUITE, argv)


if __name__ == "__main__":
    main()
