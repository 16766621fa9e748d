"""torchvision segmentation models exported with torch's classic and dynamo exporters: onnxcam's
gradient of the top class's region score at the automatic layer against ``torch.autograd``.

FCN, DeepLabV3 (ResNet-50 and MobileNetV3 backbones) and LRASPP, ``weights=None``, their
``"out"`` scores only, and a small Hugging Face SegFormer (needs transformers), every weight
redrawn from a fixed seed (``export_checks.well_scaled``). onnxcam reads the [N, classes, H, W]
output as classes per pixel; the score is the top class's
logits summed over the pixels it wins (``onnxcam.explain.regions``), the same sum torch
differentiates here. torchvision's models upsample their scores to the input's own size, a Resize
whose sizes the graph computes; SegFormer's stay at a quarter of it. The comparison, the command line and the output are
``export_checks.py``'s (see ``check_torchvision_exports.py``). Needs torch, torchvision and
onnxscript::

    .cache/tvenv/bin/python scripts/check_segmentation_exports.py
    .cache/tvenv/bin/python scripts/check_segmentation_exports.py lraspp_mobilenet_v3_large --exporter classic
"""

from __future__ import annotations

import export_checks  # scripts/export_checks.py: scripts/ is on sys.path when run as python scripts/NAME.py

MODELS = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
          "segformer"]


def build(name: str):
    """The model's class scores as forward(input) -> [N, classes, H, W], with well-scaled weights."""
    import torch
    import torchvision

    class Scores(torch.nn.Module):
        def __init__(self, model, key):
            super().__init__()
            self.model, self.key = model, key

        def forward(self, x):
            out = self.model(x)
            return out[self.key] if isinstance(out, dict) else getattr(out, self.key)

    torch.manual_seed(0)
    if name == "segformer":  # Hugging Face's: logits at a quarter of the input's size, not upsampled
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(num_labels=6, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64],
                                 decoder_hidden_size=64, num_attention_heads=[1, 2, 3, 4])
        return export_checks.well_scaled(Scores(SegformerForSemanticSegmentation(config), "logits").eval())
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
    return export_checks.well_scaled(Scores(model, "out").eval())


SUITE = export_checks.Suite(doc=__doc__, models=MODELS, build=lambda name, exporter: build(name), width=28,
                            module_prefix="model.", batch_must_be_free=True)


def main(argv=None) -> None:
    export_checks.main(SUITE, argv)


if __name__ == "__main__":
    main()
