"""Hugging Face transformers and timm classifiers exported with torch's classic and dynamo
exporters: onnxcam's gradient at the automatic layer against ``torch.autograd`` of the same
weights.

Each model is a small random-init configuration (2 blocks for the ViTs, 10 classes; fixed seed, no
downloads) covering what these libraries write into a graph: class, distillation and register
tokens (HF ViT, DeiT, BEiT, Dinov2, Dinov2 with registers; timm ViT, DeiT, ViT with registers),
windowed and channels-last layers (Swin, ConvNeXt), convolutional stages (ResNet, EfficientNet,
RegNet), MobileViT's unfolding and LeViT's attention biases. For each model and exporter the
script exports the model (classic: opset 17 with a dynamic batch axis; dynamo: a batch of 1, which
onnxcam frees), builds the gradient model at the automatic layer, finds the torch tensor that is
that layer (the tensor a torch function returns during the forward pass -- module outputs and
functional ops alike -- whose values, seen as onnxcam sees the layer -- tokens without the leading
class/distillation/register tokens and on their patch grid, channels-last transposed -- match
onnxcam's activation A; the closest match wins, the later one on a tie, and must be within 1e-3; a
tensor changed in place after it was seen is not a candidate for the values it had), and compares
onnxcam's gradient with torch's for the top logit. The export, the match, the comparisons and the
command line are ``export_checks.py``'s, shared with ``check_torchvision_exports.py``; this script
has the models. Needs torch, transformers, timm and onnxscript, so it is a script, not a test::

    python -m venv .cache/tvenv && .cache/tvenv/bin/pip install torch transformers timm onnxscript -e .
    .cache/tvenv/bin/python scripts/check_transformers_exports.py                 # all, both exporters
    .cache/tvenv/bin/python scripts/check_transformers_exports.py hf_vit timm_regnetx_002 --exporter dynamo
    .cache/tvenv/bin/python scripts/check_transformers_exports.py --exporter dynamo23   # opset 23

Prints one line per model and exporter: ok or FAIL, the layer's layout (NCHW, NHWC, NLC), the
relative error of the gradient max|G - G_torch| / max|G_torch| ("grad err"), the relative
difference between a run of 3 inputs and the 3 single runs when the batch is free ("batch 3"), the
relative errors of the matched activation and of the logits, the seconds the check took (export,
rewrite, runs), whether the batch is free (or where a batch of 1 is built in, which is not a
failure here), the layer and the torch tensor it is (the innermost module running when a function
returned it, and the function). The weights
are redrawn so that no tensor is degenerate (see ``build``). A combination torch cannot export is
skipped and says so (torch 2.14: HF BEiT and Swin with the dynamo exporter, "Cannot view a tensor
... as a tensor with shape ..."). Exits 1 if an error is more than ``--tolerance`` or a model fails
to build or to match; a failure prints a one-line reason and the run goes on. All 17 models with
both exporters take about 2 minutes (110-150 s) on 2 CPU cores (torch 2.14, transformers 5.24, timm 1.0.31,
onnxruntime 1.31; most of it the exports).
"""

from __future__ import annotations

import export_checks  # scripts/export_checks.py: scripts/ is on sys.path when run as python scripts/NAME.py

CLASSES = 10


def _vit(**changes) -> dict:
    return dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                intermediate_size=384, num_labels=CLASSES) | changes


def _hf(name: str):
    import transformers as T

    if name == "hf_vit":
        return T.ViTForImageClassification(T.ViTConfig(**_vit()))
    if name == "hf_deit_distilled":
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**_vit()))
    if name == "hf_beit":
        return T.BeitForImageClassification(T.BeitConfig(**_vit(), use_relative_position_bias=True))
    if name == "hf_dinov2":
        return T.Dinov2ForImageClassification(T.Dinov2Config(**_vit(patch_size=14), mlp_ratio=2))
    if name == "hf_dinov2_reg":
        return T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(
            **_vit(patch_size=14), mlp_ratio=2, num_register_tokens=4))
    if name == "hf_swin":
        return T.SwinForImageClassification(T.SwinConfig(
            image_size=224, patch_size=4, embed_dim=48, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4], window_size=7,
            num_labels=CLASSES))
    if name == "hf_convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 2, 1], num_labels=CLASSES))
    if name == "hf_resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic",
            num_labels=CLASSES))
    if name == "hf_mobilevit":
        return T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=256, hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
            num_labels=CLASSES))
    if name == "hf_levit":
        return T.LevitForImageClassification(T.LevitConfig(image_size=224, num_labels=CLASSES))
    raise KeyError(name)


TIMM = {  # name: (timm architecture, arguments that make it small)
    "timm_vit_tiny": ("vit_tiny_patch16_224", dict(depth=2)),
    "timm_deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2)),
    "timm_convnext_atto": ("convnext_atto", {}),
    "timm_efficientnet_b0": ("efficientnet_b0", {}),
    "timm_regnetx_002": ("regnetx_002", {}),
    "timm_vit_reg4_gap": ("vit_medium_patch16_reg4_gap_256", dict(depth=2, embed_dim=192, num_heads=3)),
    "timm_vit_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=224)),
}
HF = ["hf_vit", "hf_deit_distilled", "hf_beit", "hf_dinov2", "hf_dinov2_reg", "hf_swin", "hf_convnext",
      "hf_resnet", "hf_mobilevit", "hf_levit"]
MODELS = HF + list(TIMM)
SIZE = {"hf_mobilevit": 256, "timm_vit_reg4_gap": 256}  # input side; 224 otherwise


def build(name: str, exporter: str):
    """The model as forward(pixel_values) -> logits, in eval mode, with well-scaled random weights."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            out = self.m(pixel_values)
            return out if isinstance(out, torch.Tensor) else out.logits

    torch.manual_seed(0)
    if name in TIMM:
        import timm

        architecture, changes = TIMM[name]
        inner = timm.create_model(architecture, pretrained=False, num_classes=CLASSES, **changes)
    else:
        inner = _hf(name)
    if name == "hf_dinov2_reg" and exporter == "classic":
        # Workaround: the classic exporter has no aten::_upsample_bicubic2d_aa, which
        # Dinov2WithRegisters' position-embedding interpolation calls even at the native size,
        # where it is the identity; skip it (the torch reference runs the same patched model).
        embeddings = inner.dinov2_with_registers.embeddings
        embeddings.interpolate_pos_encoding = lambda tokens, height, width: embeddings.position_embeddings
    # Libraries initialise for training: std 0.02 weights shrink a deep convolutional net's
    # activations to denormals, zero-initialised last norms (timm's RegNet, ResNet...) make blocks
    # identities whose outputs equal their inputs (two torch tensors with onnxcam's values, one with
    # the wrong gradient), small layer scales hide the attention's gradient; well_scaled redraws them.
    return export_checks.well_scaled(Logits(inner).eval())


SUITE = export_checks.Suite(doc=__doc__, models=MODELS, build=build, width=25, input_name="pixel_values",
                            sizes=SIZE, loggers=("transformers",), module_prefix="m.", skip_unexportable=True)


def main(argv=None) -> None:
    export_checks.main(SUITE, argv)


if __name__ == "__main__":
    main()
