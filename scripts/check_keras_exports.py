"""Keras classifiers exported with tf2onnx: onnxcam's gradients against TensorFlow's.

onnxcam's activation and gradient at the automatic layer and at chosen Keras layers against
``tf.GradientTape`` of the same weights.

Models (``weights=None``, seeded; batch-norm statistics and biases randomised so that nothing
folds away): keras.applications MobileNetV2, ResNet50 and EfficientNetB0 at 224x224, a small CNN
with ``Rescaling(1/255)`` inside, batch norm, global average pooling and a softmax head, and the
TF tutorial CNN with a ``Flatten`` head (its automatic layer is channels last). Layers: the last
block, a middle block, and for MobileNetV2 and EfficientNetB0 a layer that feeds a
``ZeroPadding2D`` (a rewritten model that onnxruntime 1.31 loads only through onnxcam's runtime).
tf2onnx names every tensor ``<model>/<keras layer>/<op>``, so a Keras layer is onnxcam's last
candidate of that name. The score is the pre-softmax logit of the top class.

TensorFlow and onnxcam need different onnx and protobuf versions, so the script runs in two
halves, one per virtual environment (tensorflow-cpu 2.15 needs Python 3.9 to 3.11)::

    python3 -m venv .cache/tfvenv && .cache/tfvenv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1
    .cache/tfvenv/bin/python scripts/check_keras_exports.py export --out .cache/keras
    .venv/bin/python scripts/check_keras_exports.py check --out .cache/keras

``export`` writes ``NAME.onnx`` (dynamic batch) and ``NAME.npz`` (the NHWC input ``x``, the
logits, and per layer ``A`` and ``dS/dA``; a batch ``x3`` of three with one class per row).
``check`` prints one line per model and layer: the relative errors
``max|onnxcam - keras| / max|keras|`` of the activation (NHWC made channels first), the gradient
and the logits, and how far a run of ``x3`` is from each row's single run; then one line per
model with the preprocessing preset the Explainer picks after a Grad-CAM of a random image ("raw"
expected for the models with ``Rescaling`` inside). A layer that fails to build or run prints a
one-line reason and the run goes on. Exits 1 if any error is more than ``--tolerance`` or
anything failed. On 2 CPU cores: export about 65 s, check about 15 s.

The errors are about 1e-6. One far larger with every other number small is worth a look before
blaming onnxcam: a ReLU input within float32 rounding of 0 (about 1e-7 of its scale, which random
weights make likely enough) can be cut by onnxruntime and passed by TensorFlow, and then every
gradient through it differs. Seen here: ResNet50's gradient at ``conv4_block6_out`` for the third
input of ``x3`` is 7e-3 from Keras's, from one ReLU of ``conv5_block1_out`` whose input TensorFlow
makes 3e-7 (on a scale of 5); that is why the run of three is compared with onnxcam's own single
runs and not with Keras.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

#         name: (opset, Keras layers with a reference: the last block first)
MODELS = {
    "mobilenetv2": (13, ["out_relu", "block_10_expand_relu", "block_13_expand_relu"]),
    "resnet50": (15, ["conv5_block3_out", "conv4_block6_out"]),
    "efficientnetb0": (17, ["top_activation", "block5a_expand_activation", "block3a_expand_activation"]),
    "small_cnn": (13, ["act3", "relu2"]),
    "flatten_cnn": (13, ["pool3", "conv2"]),
}


# -- export (TensorFlow venv) ------------------------------------------------------------------
def build(name: str):
    import tensorflow as tf

    layers = tf.keras.layers
    if name == "mobilenetv2":
        return tf.keras.applications.MobileNetV2(weights=None)
    if name == "resnet50":
        return tf.keras.applications.ResNet50(weights=None)
    if name == "efficientnetb0":
        return tf.keras.applications.EfficientNetB0(weights=None)
    if name == "small_cnn":
        inputs = tf.keras.Input((64, 64, 3), name="image")
        x = layers.Rescaling(1 / 255, name="rescale")(inputs)
        x = layers.Conv2D(16, 3, padding="same", name="conv1")(x)
        x = layers.BatchNormalization(name="bn1")(x)
        x = layers.ReLU(name="relu1")(x)
        x = layers.MaxPooling2D(2, name="pool1")(x)
        x = layers.Conv2D(32, 3, padding="same", name="conv2")(x)
        x = layers.BatchNormalization(name="bn2")(x)
        x = layers.ReLU(name="relu2")(x)
        x = layers.Conv2D(32, 3, strides=2, padding="same", name="conv3")(x)
        x = layers.BatchNormalization(name="bn3")(x)
        x = layers.Activation("swish", name="act3")(x)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        x = layers.Dropout(0.2, name="drop")(x)
        return tf.keras.Model(inputs, layers.Dense(10, activation="softmax", name="predictions")(x), name=name)
    if name == "flatten_cnn":  # the TF image classification tutorial's model
        return tf.keras.Sequential([
            tf.keras.Input((96, 96, 3), name="image"),
            layers.Rescaling(1 / 255, name="rescale"),
            layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            layers.MaxPooling2D(name="pool3"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="fc1"),
            layers.Dense(5, name="predictions"),
        ], name=name)
    raise ValueError(name)


def randomise(model, seed: int = 0) -> None:
    """Batch-norm statistics and scales, and every bias, as a trained model has them."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):  # gamma, beta, mean, variance
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i in (0, 3) else
                               rng.normal(0, 0.1, w.shape).astype(np.float32)
                               for i, w in enumerate(layer.get_weights())])
        elif getattr(layer, "bias", None) is not None:
            scale = 0.5 if isinstance(layer, tf.keras.layers.Dense) else 0.1
            layer.bias.assign(rng.normal(0, scale, layer.bias.shape).astype(np.float32))


def references(model, keras_layers: list[str], x: np.ndarray) -> dict:
    """A and dS/dA of the pre-softmax logit of x's top class, at each of ``keras_layers``."""
    import tensorflow as tf

    head = model.layers[-1]
    if isinstance(head, tf.keras.layers.Activation):
        logits_tensor, activation = head.input, None
    else:  # a Dense with its squashing: the same model with the Dense linear
        activation, head.activation = head.activation, tf.keras.activations.linear
        logits_tensor = head.output
    try:
        sub = tf.keras.Model(model.inputs, [model.get_layer(k).output for k in keras_layers] + [logits_tensor])
        with tf.GradientTape() as tape:
            *maps, logits = sub(tf.constant(x), training=False)
            target = int(np.argmax(logits.numpy()[0]))
            score = logits[0, target]
        grads = tape.gradient(score, maps)
        logits = logits.numpy()
    finally:
        if activation is not None:
            head.activation = activation
    probabilities = model(tf.constant(x), training=False).numpy()
    squash = {"softmax": tf.nn.softmax, "sigmoid": tf.sigmoid}.get(getattr(activation, "__name__", ""), tf.identity)
    if not np.allclose(squash(logits).numpy(), probabilities, atol=1e-5):
        raise RuntimeError("the pre-softmax logits do not give the model's output")
    out = {"logits": logits, "target": np.array([target])}
    for k, a, g in zip(keras_layers, maps, grads):  # no gradient (None): the layer does not reach the score
        out.update({f"A__{k}": a.numpy(), f"G__{k}": np.zeros(a.shape, np.float32) if g is None else g.numpy()})
    return out


def export(names: list[str], out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        opset, keras_layers = MODELS[name]
        start = time.perf_counter()
        tf.keras.utils.set_random_seed(0)
        model = build(name)
        randomise(model)
        shape = tuple(model.input_shape[1:])
        rescaled = any(isinstance(layer, tf.keras.layers.Rescaling) for layer in model.layers)
        rng = np.random.default_rng(1)
        if rescaled:  # the model takes 0-255 pixels
            x, x3 = (rng.uniform(0, 255, (n, *shape)).astype(np.float32) for n in (1, 3))
        else:
            x, x3 = (rng.standard_normal((n, *shape)).astype(np.float32) for n in (1, 3))
        ref = references(model, keras_layers, x)
        targets3 = (int(ref["target"][0]) + np.arange(3)) % ref["logits"].shape[1]  # one class per row
        spec = [tf.TensorSpec((None, *shape), tf.float32, name="input")]
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(out / f"{name}.onnx"))
        np.savez(out / f"{name}.npz", x=x, x3=x3, targets3=targets3, layers=np.array(keras_layers),
                 expected_preset="raw" if rescaled else "", **ref)
        print(f"{name}: exported (opset {opset}, input {[None, *shape]}), references for "
              f"{', '.join(keras_layers)} ({time.perf_counter() - start:.0f} s)", flush=True)


# -- check (onnxcam venv) ----------------------------------------------------------------------
def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def keras_name(tensor: str) -> str | None:
    parts = tensor.split("/")
    return parts[1] if len(parts) >= 3 else None


def nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def check_layer(name: str, ref, keras_layer: str, gm, tag: str, tolerance: float) -> bool:
    from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED
    from onnxcam.runtime.providers import create_session

    session, _ = create_session(gm.model.SerializeToString(), device="cpu")
    x, x3, target, targets3 = ref["x"], ref["x3"], int(ref["target"][0]), ref["targets3"]
    classes = ref["logits"].shape[1]
    seed = np.zeros((1, classes), np.float32)
    seed[0, target] = 1
    A, G, logits = session.run([ACTIVATION, GRADIENT, LOGITS], {gm.input_name: x, SEED: seed})
    expected_a, expected_g = nchw(ref[f"A__{keras_layer}"]), nchw(ref[f"G__{keras_layer}"])
    head = f"{name}: layer {gm.layer} ({tag}, {gm.layer_layout})"
    if A.shape != expected_a.shape:
        print(f"{head}: activation {list(A.shape)}, Keras layer {keras_layer} {list(expected_a.shape)}; not compared")
        return False
    errors = [relative(A, expected_a), relative(G, expected_g), relative(logits, ref["logits"])]
    line = f"{head}: A {errors[0]:.1e}, gradient {errors[1]:.1e}, logits {errors[2]:.1e}"
    if gm.batch_built_in is None:
        seeds = np.zeros((3, classes), np.float32)
        seeds[np.arange(3), targets3] = 1
        together = session.run([GRADIENT], {gm.input_name: x3, SEED: seeds})[0]
        alone = np.concatenate([session.run([GRADIENT], {gm.input_name: x3[i:i + 1], SEED: seeds[i:i + 1]})[0]
                                for i in range(3)])
        errors.append(relative(together, alone))
        line += f", a run of 3 against single runs {errors[3]:.1e}"
    else:
        line += f"; batch of 1 built in at {gm.batch_built_in!r} (the export's batch is dynamic)  FAIL"
    if max(errors) > tolerance:
        line += f"  FAIL (over the tolerance {tolerance:g})"
    print(line)
    return gm.batch_built_in is None and max(errors) <= tolerance


def check_preset(name: str, path: Path, ref) -> bool:
    from PIL import Image

    from onnxcam import Explainer

    explainer = Explainer(path, device="cpu", cache=False)
    height, width = explainer.model_size[:2]
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    result = explainer.explain(Image.fromarray(pixels), method="gradcam")[0]
    info = explainer.preprocessing_info()
    expected = str(ref["expected_preset"])
    ok = bool(np.isfinite(result.map).all()) and (not expected or info["preset"] == expected)
    wanted = f" (expected {expected})" if expected else ""
    print(f"{name}: Explainer preset {info['preset']}{wanted}: {info['source']}" + ("" if ok else "  FAIL"))
    return ok


def check(names: list[str], out: Path, tolerance: float) -> bool:
    from onnxcam.graph.rewrite import build_gradient_model

    results = []
    for name in names:
        path = out / f"{name}.onnx"
        try:
            ref = np.load(out / f"{name}.npz")
            keras_layers = [str(k) for k in ref["layers"]]
            auto = build_gradient_model(path)
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}  FAIL")
            results.append(False)
            continue
        automatic = keras_name(auto.layer)
        if automatic not in keras_layers:
            print(f"{name}: the automatic layer {auto.layer} has no Keras reference (references: "
                  f"{', '.join(keras_layers)})  FAIL")
            results.append(False)
        jobs = [(automatic, "automatic")] if automatic in keras_layers else []
        jobs += [(k, "Keras " + k) for k in keras_layers if k != automatic]
        for keras_layer, tag in jobs:
            try:
                if tag == "automatic":
                    gm = auto
                else:
                    tensors = [c.tensor for c in auto.candidates if keras_name(c.tensor) == keras_layer]
                    if not tensors:
                        raise LookupError(f"no candidate layer of Keras layer {keras_layer}")
                    gm = build_gradient_model(path, layer=tensors[-1])
                results.append(check_layer(name, ref, keras_layer, gm, tag, tolerance))
            except Exception as exc:
                print(f"{name}: {tag}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}  FAIL")
                results.append(False)
        try:
            results.append(check_preset(name, path, ref))
        except Exception as exc:
            print(f"{name}: Explainer: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}  FAIL")
            results.append(False)
    return all(results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    for step, text in (("export", "build, export and write the Keras references (TensorFlow venv)"),
                       ("check", "compare onnxcam with the references (onnxcam venv)")):
        sub = steps.add_parser(step, help=text, description=text)
        sub.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
        sub.add_argument("--out", type=Path, required=True, help="folder of the .onnx models and .npz references")
        if step == "check":
            sub.add_argument("--tolerance", type=float, default=1e-4,
                             help="largest relative error that passes (default: 1e-4)")
    args = parser.parse_args(argv)
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    start = time.perf_counter()
    if args.step == "export":
        export(names, args.out)
        print(f"exported {len(names)} model(s) to {args.out} in {time.perf_counter() - start:.0f} s")
        return
    ok = check(names, args.out, args.tolerance)
    print(f"{'all checks passed' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
