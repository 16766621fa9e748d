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
by value rather than assumed). Needs torch, torchvision and onnxscript, so it is a script, not a
test::

    python -m venv .cache/tvenv && .cache/tvenv/bin/pip install torch torchvision onnxscript -e .
    .cache/tvenv/bin/python scripts/check_torchvision_exports.py                 # all, both exporters
    .cache/tvenv/bin/python scripts/check_torchvision_exports.py convnext_tiny swin_t --exporter dynamo

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

ACTIVATION_TOLERANCE = 1e-3  # relative: the torch tensor must hold the values of onnxcam's A
MODELS = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
          "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
          "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
          "swin_v2_t", "vgg11", "vit_b_32", "vit_b_16"]
SIZE = {"inception_v3": 299}  # input side; 224 otherwise


def build(name: str):
    """The torchvision model, in eval mode, with well-scaled random weights and no in-place modules."""
    import torch
    import torchvision

    torch.manual_seed(0)
    changes = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}  # redrawn below anyway
    model = getattr(torchvision.models, name)(weights=None, **changes).eval()
    with torch.no_grad():
        # torchvision initialises for training: ViT's head is zero (every gradient 0), ConvNeXt's
        # layer scales are 1e-6 (the blocks all but identities, their outputs equal to their inputs:
        # two torch tensors with onnxcam's values, one with the wrong gradient). Redraw every matrix
        # and kernel with std 1/sqrt(fan_in) and give every vanishing scale 1.
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, parameter[0].numel() ** -0.5)
            elif not parameter_name.endswith("bias") and parameter.abs().max() < 1e-3:
                parameter.fill_(1.0)
    for module in model.modules():  # in-place ops would change a seen tensor after it was seen
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def export(model, x, path: Path, exporter: str) -> None:
    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "classic":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
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
        lead = t.shape[1] - h * w  # ViT's class token comes first
        found.append((f"NLC, {lead} leading token{'s' if lead > 1 else ''} dropped" if lead else "NLC",
                      lambda u: u[:, lead:].reshape(n, h, w, c).permute(0, 3, 1, 2)))
    return found


def torch_layer(model, x: np.ndarray, A: np.ndarray):
    """Run the model, keeping every tensor a torch function returns that can be viewed as A; return
    the logits and (description, tensor, view, relative error) of the closest to A (None if none)."""
    import torch

    running = ["model"]  # the innermost module running, to name a tensor
    caught = []  # (description, tensor, view, values when seen, version when seen)

    class Seen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if kwargs.get("inplace"):  # F.relu(x, inplace=True) and the like (DenseNet)
                kwargs["inplace"] = False
            out = func(*args, **kwargs)
            function = getattr(func, "__name__", str(func))
            if function not in ("__get__", "__set__"):
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    # a tensor changed in place (x += y) is seen again with its new values
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        for view_name, view in views(A.shape, t):
                            caught.append((f"{running[-1]}: {function} ({view_name})", t, view,
                                           view(t.detach()).numpy().copy(), t._version))
            return out

    def enter(module, args, label):
        running.append(label)

    def leave(module, args, out):  # returns None: the module's output stays
        running.pop()

    hooks = []
    for module_name, module in model.named_modules():
        if module_name:
            label = f"{module_name} ({type(module).__name__})"
            hooks.append(module.register_forward_pre_hook(lambda m, args, label=label: enter(m, args, label)))
            hooks.append(module.register_forward_hook(leave))
    try:
        with Seen():
            logits = model(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    scale = max(float(np.abs(A).max()), 1e-30)
    best = None
    for where, t, view, value, version in caught:  # later tensors win ties: the automatic layer is a late one
        if t._version != version:  # changed in place since: autograd would differentiate its later value
            continue
        error = float(np.abs(value - A).max()) / scale
        if best is None or error <= best[-1]:
            best = (where, t, view, error)
    return logits, best


def _reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message, without terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def check(name: str, exporter: str, folder: Path, tolerance: float) -> bool:
    """Print one line; return whether the model passed."""
    import onnxruntime as ort
    import torch

    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, build_gradient_model

    head = f"{name:<19} {exporter:<8}"
    start = time.perf_counter()
    model = build(name)
    side = SIZE.get(name, 224)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    path = folder / f"{name}_{exporter}.onnx"
    try:
        export(model, x, path, exporter)
    except Exception as exc:  # noqa: BLE001 - torch's failure, but every one of these exported before
        while exc.__cause__ is not None or exc.__context__ is not None:  # the root cause says most
            exc = exc.__cause__ or exc.__context__
        print(f"{head} FAIL torch cannot export it: {_reason(exc)}", flush=True)
        return False
    try:
        gm = build_gradient_model(path)
        session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            logits = model(x)
        target = int(logits.argmax())
        seed = np.zeros((1, logits.shape[1]), np.float32)
        seed[0, target] = 1.0
        A, G, L = session.run([ACTIVATION, GRADIENT, LOGITS], {gm.input_name: x.numpy(), SEED: seed})
        batch = "-"
        batch_error = 0.0
        if gm.batch_built_in is None:
            xs = np.random.default_rng(2).standard_normal((3, 3, side, side)).astype(np.float32)
            seeds = np.repeat(seed, 3, axis=0)
            together = session.run([GRADIENT], {gm.input_name: xs, SEED: seeds})[0]
            alone = np.concatenate([session.run([GRADIENT], {gm.input_name: xs[i:i + 1], SEED: seeds[i:i + 1]})[0]
                                    for i in range(3)])
            batch_error = float(np.abs(together - alone).max() / max(np.abs(alone).max(), 1e-30))
            batch = f"{batch_error:.1e}"
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"{head} FAIL to build or run: {_reason(exc)}", flush=True)
        return False
    finally:
        path.unlink(missing_ok=True)  # VGG and the ViTs are 0.3-0.5 GB each
    logits, best = torch_layer(model, x.numpy(), A)
    if best is None or best[-1] > ACTIVATION_TOLERANCE:
        found = "no torch tensor has its shape" if best is None else \
            f"closest: {best[0]}, relative error {best[-1]:.1e}"
        print(f"{head} FAIL no torch tensor holds the activation at {gm.layer} ({gm.layer_layout}); {found}",
              flush=True)
        return False
    where, activation, view, activation_error = best
    (grad,) = torch.autograd.grad(logits[0, target], activation)
    expected = view(grad).numpy()
    scale = float(np.abs(expected).max())
    error = float(np.abs(G - expected).max()) / scale if scale > 0 else float("inf")  # a zero gradient tests nothing
    reference = logits.detach().numpy()
    logit_error = float(np.abs(L - reference).max() / np.abs(reference).max())
    seconds = time.perf_counter() - start
    if gm.batch_built_in is None:
        batch_line = "batch free"
    else:
        batch_line = f"BATCH OF 1 BUILT IN after {gm.batch_built_in} (expected free)"
    ok = error <= tolerance and batch_error <= tolerance and gm.batch_built_in is None
    print(f"{head} {'ok' if ok else 'FAIL':<4} {gm.layer_layout:<4} {error:8.1e} {batch:>8} {activation_error:8.1e} "
          f"{logit_error:8.1e} {seconds:5.0f}  {batch_line}; layer {gm.layer} = {where}", flush=True)
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS, metavar="MODEL",
                        help=f"torchvision models to check (default: all): {' '.join(MODELS)}")
    parser.add_argument("--exporter", choices=("classic", "dynamo", "both"), default="both")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative gradient error and batch-of-3 difference (default 1e-4)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {' '.join(MODELS)}")
    exporters = ("classic", "dynamo") if args.exporter == "both" else (args.exporter,)
    for noisy in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    start = time.perf_counter()
    print(f"{'model':<19} {'exporter':<8} {'':<4} {'lay.':<4} {'grad err':>8} {'batch 3':>8} {'act err':>8} "
          f"{'logits':>8} {'s':>5}  batch; layer = torch tensor", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for exporter in exporters:
                try:
                    results.append(check(name, exporter, Path(folder), args.tolerance))
                except Exception as exc:  # noqa: BLE001 - a broken harness run still reports the rest
                    print(f"{name:<19} {exporter:<8} FAIL {_reason(exc)}", flush=True)
                    results.append(False)
    print(f"{results.count(True)} passed, {results.count(False)} failed in {time.perf_counter() - start:.0f} s",
          flush=True)
    sys.exit(1 if False in results else 0)


if __name__ == "__main__":
    main()
