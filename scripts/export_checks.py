"""What ``check_torchvision_exports.py`` and ``check_transformers_exports.py`` share: export a torch
classifier with torch's classic or dynamo exporter, build onnxcam's gradient model at the automatic
layer, find the torch tensor that is that layer by value, compare onnxcam's gradient with
``torch.autograd``'s for the top logit, compare a run of 3 inputs with the 3 single runs, and print
one line per model and exporter.

A script describes its models with a ``Suite`` (their names, how to build one, input sides, and
how to count an export torch cannot make or a batch of 1 built in) and calls ``main(suite)``.
Not a module of onnxcam: it needs torch and onnxscript, and the scripts import it from
``scripts/``, which is on ``sys.path`` when they run as ``python scripts/NAME.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ACTIVATION_TOLERANCE = 1e-3  # relative: the torch tensor must hold the values of onnxcam's A


@dataclass(frozen=True)
class Suite:
    """The models a script checks and how it counts what goes wrong."""

    doc: str  # the script's docstring; its first line describes the command
    models: list[str]  # the default and the choices, in order
    build: Callable  # (name, exporter) -> the model as forward(input) -> logits, in eval mode
    width: int  # of the model column
    input_name: str = "input"  # of the classic export's input
    sizes: dict[str, int] | None = None  # input side by model; 224 otherwise
    loggers: tuple[str, ...] = ()  # more loggers to quieten than torch's and onnxscript's
    module_prefix: str = ""  # dropped from module names in a tensor's description (a wrapper's)
    skip_unexportable: bool = False  # an export torch cannot make is skipped, not a failure
    batch_must_be_free: bool = False  # a batch of 1 built in is a failure, not a note
    opt_in: tuple[str, ...] = ()  # more choices, run only when named (models over 2 GB)


def well_scaled(model):
    """``model`` with every matrix and kernel redrawn with std 1/sqrt(fan_in), every vanishing scale
    (a non-bias vector under 1e-3) set to 1, and no in-place modules; the model, for chaining.

    Libraries initialise for training, which leaves degenerate tensors (zero heads, identity blocks
    whose outputs equal their inputs, denormal activations); the caller seeds torch first."""
    import torch

    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, parameter[0].numel() ** -0.5)
            elif not parameter_name.endswith("bias") and parameter.abs().max() < 1e-3:
                parameter.fill_(1.0)
    for module in model.modules():  # in-place ops would change a seen tensor after it was seen
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def export(model, x, path: Path, exporter: str, input_name: str = "input") -> None:
    """Classic: opset 17 with a dynamic batch axis; dynamo: the batch of ``x`` (onnxcam frees it);
    dynamo23: the same at opset 23 (ONNX's Attention, GroupNormalization, RMSNormalization)."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "classic":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                              output_names=["logits"],
                              dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}})
        else:
            extra = {"opset_version": 23} if exporter == "dynamo23" else {}
            torch.onnx.export(model, (x,), dynamo=True, verbose=False, **extra).save(str(path))


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


def torch_layer(model, x: np.ndarray, A: np.ndarray, module_prefix: str = ""):
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
        name = module_name.removeprefix(module_prefix)
        if module_name and name:
            label = f"{name} ({type(module).__name__})"
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


def _class_score(gm, logits):
    """(the seed onnxcam runs with, the torch score it differentiates) for the top class: its
    logit, or for a segmentation model (per-pixel logits) its logits summed over its region."""
    import torch

    if gm.class_grid is None:
        target = int(logits.argmax())
        seed = np.zeros((1, logits.shape[1]), np.float32)
        seed[0, target] = 1.0
        return seed, lambda values: values[0, target]
    from onnxcam.explain.regions import PixelClasses

    regions = PixelClasses.of(gm.num_classes, gm.class_grid, "softmax", None, gm.class_axis)
    flat = logits.detach().numpy().reshape(1, -1)
    target = regions.top_classes(flat, 1)[0][0]
    seed = regions.seeds(flat, [0], [target])
    mask = torch.from_numpy(seed.reshape(logits.shape))  # the region, on the class's plane
    return seed, lambda values: (values * mask).sum()


def reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message, without terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def check(suite: Suite, name: str, exporter: str, folder: Path, tolerance: float) -> bool | None:
    """Print one line; return whether the model passed, None when torch cannot export it and the
    suite skips such exports."""
    import torch

    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED
    from onnxcam.runtime.cache import load_gradient_model
    from onnxcam.runtime.providers import create_session

    head = f"{name:<{suite.width}} {exporter:<8}"
    start = time.perf_counter()
    model = suite.build(name, exporter)
    side = (suite.sizes or {}).get(name, 224)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    own = folder / f"{name}_{exporter}"  # its own folder: a model over 2 GB comes with external data files
    own.mkdir()
    path = own / f"{name}_{exporter}.onnx"
    try:
        export(model, x, path, exporter, suite.input_name)
    except Exception as exc:  # noqa: BLE001 - torch's failure, not onnxcam's
        while exc.__cause__ is not None or exc.__context__ is not None:  # the root cause says most
            exc = exc.__cause__ or exc.__context__
        if suite.skip_unexportable:
            print(f"{head} skipped: torch cannot export it ({reason(exc)})", flush=True)
            return None
        print(f"{head} FAIL torch cannot export it: {reason(exc)}", flush=True)
        return False
    try:
        # the path a user's model takes: weights over 64 MiB in a file that the sessions map
        gm, _ = load_gradient_model(path, use_cache=False)
        session, _ = create_session(gm.model, "cpu")  # told where any external data is
        with torch.no_grad():
            logits = model(x)
        seed, score_of = _class_score(gm, logits)
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
        print(f"{head} FAIL to build or run: {reason(exc)}", flush=True)
        return False
    finally:
        shutil.rmtree(own, ignore_errors=True)  # VGG and the ViTs are 0.3-0.5 GB each, ViT-H 2.5 GB
    logits, best = torch_layer(model, x.numpy(), A, suite.module_prefix)
    if best is None or best[-1] > ACTIVATION_TOLERANCE:
        found = "no torch tensor has its shape" if best is None else \
            f"closest: {best[0]}, relative error {best[-1]:.1e}"
        print(f"{head} FAIL no torch tensor holds the activation at {gm.layer} ({gm.layer_layout}); {found}",
              flush=True)
        return False
    where, activation, view, activation_error = best
    (grad,) = torch.autograd.grad(score_of(logits), activation)
    expected = view(grad).numpy()
    scale = float(np.abs(expected).max())
    error = float(np.abs(G - expected).max()) / scale if scale > 0 else float("inf")  # a zero gradient tests nothing
    reference = logits.detach().numpy().reshape(L.shape)  # a segmentation model's logits come flattened
    logit_error = float(np.abs(L - reference).max() / np.abs(reference).max())
    seconds = time.perf_counter() - start
    if gm.batch_built_in is None:
        batch_line = "batch free"
    elif suite.batch_must_be_free:
        batch_line = f"BATCH OF 1 BUILT IN after {gm.batch_built_in} (expected free)"
    else:
        batch_line = f"batch of 1 built in at {gm.batch_built_in}"
    ok = error <= tolerance and batch_error <= tolerance and (gm.batch_built_in is None or not suite.batch_must_be_free)
    print(f"{head} {'ok' if ok else 'FAIL':<4} {gm.layer_layout:<4} {error:8.1e} {batch:>8} {activation_error:8.1e} "
          f"{logit_error:8.1e} {seconds:5.0f}  {batch_line}; layer {gm.layer} = {where}", flush=True)
    return ok


def main(suite: Suite, argv=None) -> None:
    """Parse the command line, check every model with every exporter asked for, print a summary and
    exit 1 if any failed."""
    models = suite.models
    parser = argparse.ArgumentParser(description=suite.doc.splitlines()[0])
    opt_in = f"; only when named: {' '.join(suite.opt_in)}" if suite.opt_in else ""
    parser.add_argument("models", nargs="*", default=models, metavar="MODEL",
                        help=f"models to check (default: all): {' '.join(models)}{opt_in}")
    parser.add_argument("--exporter", choices=("classic", "dynamo", "dynamo23", "both"), default="both",
                        help="both: classic and dynamo; dynamo23: dynamo at opset 23")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative gradient error and batch-of-3 difference (default 1e-4)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in models and name not in suite.opt_in]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {' '.join(models + list(suite.opt_in))}")
    exporters = ("classic", "dynamo") if args.exporter == "both" else (args.exporter,)
    for noisy in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", *suite.loggers):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    start = time.perf_counter()
    print(f"{'model':<{suite.width}} {'exporter':<8} {'':<4} {'lay.':<4} {'grad err':>8} {'batch 3':>8} "
          f"{'act err':>8} {'logits':>8} {'s':>5}  batch; layer = torch tensor", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for exporter in exporters:
                try:
                    results.append(check(suite, name, exporter, Path(folder), args.tolerance))
                except Exception as exc:  # noqa: BLE001 - a broken harness run still reports the rest
                    print(f"{name:<{suite.width}} {exporter:<8} FAIL {reason(exc)}", flush=True)
                    results.append(False)
    skipped = f", {results.count(None)} skipped (torch cannot export them)" if suite.skip_unexportable else ""
    print(f"{results.count(True)} passed, {results.count(False)} failed{skipped} "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if False in results else 0)
