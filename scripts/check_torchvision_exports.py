"""torchvision classifiers exported with torch's classic and dynamo exporters: onnxcam's gradient
at the automatic layer against ``torch.autograd`` of the same weights, and the batch left free.

One or two models of every torchvision classification family, ``weights=None`` (no downloads)
with every weight redrawn from a fixed seed so that no tensor is degenerate (see ``build``):
AlexNet, ConvNeXt, DenseNet, EfficientNet and EfficientNetV2, GoogLeNet, Inception v3 (at 299),
MaxViT, MNASNet, MobileNet v2 and v3, RegNet X and Y, ResNet, ResNeXt, ShuffleNetV2, SqueezeNet,
Swin and Swin V2, VGG, ViT (vit_b_32 and vit_b_16). For each model and exporter the script exports
the model (classic: opset 17 with a dynamic batch axis; dynamo: a batch of 1, which onnxcam frees),
builds the gradient model at the automatic layer, finds the torch tensor that is that layer and
compares onnxcam's gradient with torch's for the top logit. The torch
tensor is found by value: every tensor a torch function returns during the forward pass (module
outputs and functional ops alike: DenseNet's ``F.relu``, ViT's residual ``+``, ConvNeXt's in-place
``result += input``), seen as onnxcam sees the layer -- tokens without the class token and on their
patch grid, channels-last transposed -- is compared with onnxcam's activation A; the closest match
wins (the later one on a tie) and must be within 1e-3. A tensor changed in place after it was seen
is not a candidate for the values it had: torch's gradient at it is the gradient at its last value.
It supersedes ``check_dynamo_exports.py`` for breadth (22 models, both exporters, the layer matched
by value rather than assumed). The export, the match, the comparisons and the command line are
``export_checks.py``'s, shared with ``check_transformers_exports.py``; this script has the models. Needs torch, torchvision and onnxscript, so it is a script, not a
test::

    python -m venv .cache/tvenv && .cache/tvenv/bin/pip install torch torchvision onnxscript -e .
    .cache/tvenv/bin/python scripts/check_torchvision_exports.py                 # all, both exporters
    .cache/tvenv/bin/python scripts/check_torchvision_exports.py convnext_tiny swin_t --exporter dynamo
    .cache/tvenv/bin/python scripts/check_torchvision_exports.py --exporter dynamo23   # opset 23

Prints one line per model and exporter: ok or FAIL, the layer's layout (NCHW, NHWC, NLC), the
relative error of the gradient max|G - G_torch| / max|G_torch| ("grad err"), the relative
difference between a run of 3 inputs and the 3 single runs ("batch 3"), the relative errors of
the matched activation and of the logits, the seconds the check took (export, rewrite, runs),
whether the batch is free, the layer and the torch tensor it is (the innermost module running
when a function returned it, and the function). Every one of these exports is expected to run in
batches: a batch of 1 built in is a failure, and its line says after which node. Exits 1 if a
gradient error or batch-of-3 difference is more than ``--tolerance``, a batch is built in, or a
model fails to export, build or match; a failure prints a one-line reason and the run goes on.
All 22 models with both exporters take about 8 minutes (483 s, of which vit_b_16 35 s) on 2 CPU
cores (torch 2.14.1, torchvision 0.29.1, onnxruntime 1.31.1, onnxscript 0.7.2; the slowest are
MaxViT, Swin V2 and EfficientNetV2, 20-35 s each per exporter).
"""

from __future__ import annotations

import export_checks  # scripts/export_checks.py: scripts/ is on sys.path when run as python scripts/NAME.py

MODELS = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
          "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
          "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
          "swin_v2_t", "vgg11", "vit_b_32", "vit_b_16"]
#: Run only when named: ViT-H/14 (632 M parameters, 2.5 GB in float32) is over protobuf's 2 GB
#: limit, so both exporters write it with external data files (onnxcam/graph/external.py).
OPT_IN = ("vit_h_14",)
SIZE = {"inception_v3": 299}  # input side; 224 otherwise


def build(name: str):
    """The torchvision model, in eval mode, with well-scaled random weights and no in-place modules."""
    import torch
    import torchvision

    torch.manual_seed(0)
    changes = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}  # redrawn anyway
    # torchvision initialises for training: ViT's head is zero (every gradient 0), ConvNeXt's layer
    # scales are 1e-6 (the blocks all but identities, their outputs equal to their inputs: two torch
    # tensors with onnxcam's values, one with the wrong gradient); well_scaled redraws them.
    return export_checks.well_scaled(getattr(torchvision.models, name)(weights=None, **changes).eval())


SUITE = export_checks.Suite(doc=__doc__, models=MODELS, build=lambda name, exporter: build(name), width=19,
                            sizes=SIZE, batch_must_be_free=True, opt_in=OPT_IN)


def main(argv=None) -> None:
    export_checks.main(SUITE, argv)


if __name__ == "__main__":
    main()
