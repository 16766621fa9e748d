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
that layer (the module input or output whose values, seen as onnxcam sees the layer -- tokens
without the leading class/distillation/register tokens and on their patch grid, channels-last
transposed -- match onnxcam's activation A; the closest match wins and must be within 1e-3), and
compares onnxcam's gradient with torch's for the top logit. Needs torch, transformers, timm and
onnxscript, so it is a script, not a test::

    python -m venv .cache/tvenv && .cache/tvenv/bin/pip install torch transformers timm onnxscript -e .
    .cache/tvenv/bin/python scripts/check_transformers_exports.py                 # all, both exporters
    .cache/tvenv/bin/python scripts/check_transformers_exports.py hf_vit timm_regnetx_002 --exporter dynamo

Prints one line per model and exporter: ok or FAIL, the layer's layout (NCHW, NHWC, NLC), the
relative error of the gradient max|G - G_torch| / max|G_torch| ("grad err"), the relative
difference between a run of 3 inputs and the 3 single runs when the batch is free ("batch 3"), the
relative errors of the matched activation and of the logits, whether the batch is free (or where a
batch of 1 is built in), the layer and the torch module whose input or output it is. The weights
are redrawn so that no tensor is degenerate (see ``build``). A combination torch cannot export is
skipped and says so (torch 2.14: HF BEiT and Swin with the dynamo exporter, "Cannot view a tensor
... as a tensor with shape ..."). Exits 1 if an error is more than ``--tolerance`` or a model fails
to build or to match; a failure prints a one-line reason and the run goes on. All 17 models with
both exporters take about 2 minutes (110-150 s) on 2 CPU cores (torch 2.14, transformers 5.24, timm 1.0.31,
onnxruntime 1.31; most of it the exports).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

CLASSES = 10
ACTIVATION_TOLERANCE = 1e-3  # relative: the torch tensor must hold the values of onnxcam's A


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
    model = Logits(inner).eval()
    with torch.no_grad():
        # Libraries initialise for training: std 0.02 weights shrink a deep convolutional net's
        # activations to denormals, zero-initialised last norms (timm's RegNet, ResNet...) make
        # blocks identities whose outputs equal their inputs (two torch tensors with onnxcam's
        # values, one with the wrong gradient), small layer scales hide the attention's gradient.
        # Redraw every matrix with std 1/sqrt(fan_in) and give every scale 1.
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, parameter[0].numel() ** -0.5)
            elif not parameter_name.endswith("bias") and parameter.abs().max() < 1e-3:
                parameter.fill_(1.0)
    for module in model.modules():  # in-place ops would change a hooked tensor after the hook saw it
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def export(model, x, path: Path, exporter: str) -> None:
    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "classic":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["pixel_values"],
                              output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))


def views(shape: tuple, t):
    """The ways torch tensor ``t`` can be onnxcam's activation of NCHW ``shape``, as NCHW."""
    n, c, h, w = shape
    found = []
    if tuple(t.shape) == (n, c, h, w):
        found.append(("NCHW", lambda u: u))
    if tuple(t.shape) == (n, h, w, c):
        found.append(("NHWC", lambda u: u.permute(0, 3, 1, 2)))
    if t.dim() == 3 and t.shape[0] == n and t.shape[2] == c and t.shape[1] >= h * w:
        lead = t.shape[1] - h * w  # class, distillation, register tokens come first
        found.append((f"NLC, {lead} leading token{'s' if lead > 1 else ''} dropped" if lead else "NLC",
                      lambda u: u[:, lead:].reshape(n, h, w, c).permute(0, 3, 1, 2)))
    return found


def torch_layer(model, x, A: np.ndarray):
    """Run the model, hooking every module's tensor inputs and outputs that can be viewed as A;
    return the logits and (description, tensor, view, relative error) of the closest to A (None if none)."""
    import torch

    seen, caught = set(), []

    def keep(where, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
                for view_name, view in views(A.shape, t):
                    seen.add(id(t))  # only kept tensors: a freed tensor's id is reused by a new one
                    value = view(t.detach()).numpy().copy()  # the values now, whatever happens later
                    caught.append((f"{where} ({view_name})", t, view, value))

    def flat(value):
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, dict):
            return list(value.values())
        return list(value) if isinstance(value, (tuple, list)) else []

    hooks = []
    for module_name, module in model.named_modules():
        label = module_name.removeprefix("m.") or "model"
        hooks.append(module.register_forward_pre_hook(lambda m, args, label=label: keep(f"{label} input", args)))
        hooks.append(module.register_forward_hook(
            lambda m, args, out, label=label: keep(f"{label} output", flat(out))))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    scale = max(float(np.abs(A).max()), 1e-30)
    best = None
    for where, t, view, value in caught:  # later tensors win ties: the automatic layer is a late one
        error = float(np.abs(value - A).max()) / scale
        if best is None or error <= best[-1]:
            best = (where, t, view, error)
    return logits, best


def _reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message, without terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def check(name: str, exporter: str, folder: Path, tolerance: float) -> bool | None:
    """Print one line; return whether the model passed, None when torch cannot export it."""
    import onnxruntime as ort
    import torch

    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, build_gradient_model

    head = f"{name:<25} {exporter:<8}"
    model = build(name, exporter)
    side = SIZE.get(name, 224)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    path = folder / f"{name}_{exporter}.onnx"
    try:
        export(model, x, path, exporter)
    except Exception as exc:  # noqa: BLE001 - torch's failure, not onnxcam's
        while exc.__cause__ is not None or exc.__context__ is not None:  # the root cause says most
            exc = exc.__cause__ or exc.__context__
        print(f"{head} skipped: torch cannot export it ({_reason(exc)})", flush=True)
        return None
    try:
        gm = build_gradient_model(path)
        session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            target = int(model(x).argmax())
        seed = np.zeros((1, CLASSES), np.float32)
        seed[0, target] = 1.0
        A, G, L = session.run([ACTIVATION, GRADIENT, LOGITS], {gm.input_name: x.numpy(), SEED: seed})
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"{head} FAILED to build or run: {_reason(exc)}", flush=True)
        return False
    where = "batch free" if gm.batch_built_in is None else f"batch of 1 built in at {gm.batch_built_in}"
    logits, best = torch_layer(model, x.numpy(), A)
    if best is None or best[-1] > ACTIVATION_TOLERANCE:
        found = "no module input or output has its shape" if best is None else \
            f"closest: {best[0]}, relative error {best[-1]:.1e}"
        print(f"{head} FAILED: no torch tensor holds the activation at {gm.layer} ({gm.layer_layout}); {found}",
              flush=True)
        return False
    module, activation, view, activation_error = best
    (grad,) = torch.autograd.grad(logits[0, target], activation)
    expected = view(grad).numpy()
    scale = float(np.abs(expected).max())
    error = float(np.abs(G - expected).max()) / scale if scale > 0 else float("inf")  # a zero gradient tests nothing
    logit_error = float(np.abs(L - logits.detach().numpy()).max() / np.abs(logits.detach().numpy()).max())
    batch = "-"
    batch_error = 0.0
    if gm.batch_built_in is None:
        xs = np.random.default_rng(2).standard_normal((3,) + x.shape[1:]).astype(np.float32)
        seeds = np.repeat(seed, 3, axis=0)
        together = session.run([GRADIENT], {gm.input_name: xs, SEED: seeds})[0]
        alone = np.concatenate([session.run([GRADIENT], {gm.input_name: xs[i:i + 1], SEED: seeds[i:i + 1]})[0]
                                for i in range(3)])
        batch_error = float(np.abs(together - alone).max() / max(np.abs(alone).max(), 1e-30))
        batch = f"{batch_error:.1e}"
    ok = error <= tolerance and batch_error <= tolerance
    print(f"{head} {'ok' if ok else 'FAIL':<4} {gm.layer_layout:<4} {error:8.1e} {batch:>8} {activation_error:8.1e} "
          f"{logit_error:8.1e}  {where}; layer {gm.layer} = {module}", flush=True)
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS, metavar="MODEL",
                        help=f"models to check (default: all): {' '.join(MODELS)}")
    parser.add_argument("--exporter", choices=("classic", "dynamo", "both"), default="both")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative gradient error and batch-of-3 difference (default 1e-4)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {' '.join(MODELS)}")
    exporters = ("classic", "dynamo") if args.exporter == "both" else (args.exporter,)
    for noisy in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    start = time.perf_counter()
    print(f"{'model':<25} {'exporter':<8} {'':<4} {'lay.':<4} {'grad err':>8} {'batch 3':>8} {'act err':>8} "
          f"{'logits':>8}  batch; layer = torch tensor", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for exporter in exporters:
                try:
                    results.append(check(name, exporter, Path(folder), args.tolerance))
                except Exception as exc:  # noqa: BLE001 - a broken harness run still reports the rest
                    print(f"{name:<25} {exporter:<8} FAILED: {_reason(exc)}", flush=True)
                    results.append(False)
    print(f"{results.count(True)} passed, {results.count(False)} failed, {results.count(None)} skipped "
          f"(torch cannot export them) in {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if False in results else 0)


if __name__ == "__main__":
    main()
