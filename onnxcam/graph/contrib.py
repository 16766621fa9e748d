"""ONNX Runtime's own fused operators (the com.microsoft domain) rewritten as standard ONNX, and
the newer standard function operators (Attention, GroupNormalization, RMSNormalization) as the
primitives they are defined by.

A model saved after ONNX Runtime's graph optimizations (``optimized_model_filepath``, its
transformers optimizer, Olive) holds fused operators -- FusedConv, FusedGemm,
SkipLayerNormalization, BiasGelu, Attention... -- that ONNX shape inference does not know and no
gradient rule covers. Each is replaced by the standard operators it fuses, so the rest of onnxcam
sees an ordinary export: the candidate layers, the gradient rules and their finite-difference
tests all apply. One table, one small function per operator; each is checked against ONNX
Runtime's own kernel (``tests/test_contrib.py``).

The standard Attention (torch's dynamo exporter writes one per scaled_dot_product_attention from
opset 23 on) is an ONNX function whose body handles every case in dynamic shape arithmetic; the
common case is rewritten here as a few MatMuls and a Softmax, which the gradient rules cover. The
same exporter writes GroupNormalization (opset 21 on) and RMSNormalization (opset 23 on).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.errors import ModelError

MICROSOFT = "com.microsoft"
NCHWC = "com.microsoft.nchwc"


class Emitter:
    """Standard nodes standing in for one fused node: unique names from the node's own, and
    constants as initializers of the graph, in the float type the node computes in."""

    def __init__(self, graph: onnx.GraphProto, node: onnx.NodeProto, taken: set[str], opset: int,
                 dtype=np.float32, inferred: Callable[[], dict[str, onnx.TypeProto.Tensor]] = dict):
        self.graph, self.node, self.taken, self.opset, self.dtype = graph, node, taken, opset, dtype
        self.inferred = inferred
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self, hint: str) -> str:
        base = f"{self.node.name or self.node.op_type}/{hint}"
        name, count = base, 1
        while name in self.taken:
            name, count = f"{base}_{count}", count + 1
        self.taken.add(name)
        return name

    def __call__(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.fresh(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{op}_node"), **attrs))
        return out

    def multi(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        outs = [name or self.fresh(f"{op}_{i}") for i, name in enumerate(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{op}_node"), **attrs))
        return outs

    def constant(self, value, dtype=None) -> str:
        """An initializer holding ``value``, of ``dtype`` or else the node's float type."""
        name = self.fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def attr(self, name: str, default=None):
        for attribute in self.node.attribute:
            if attribute.name == name:
                value = helper.get_attribute_value(attribute)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def attrs(self, *names: str) -> dict:
        """The node's attributes of these names that it has, to pass on to a standard node."""
        return {a.name: helper.get_attribute_value(a) for a in self.node.attribute if a.name in names}

    def input(self, index: int) -> str | None:
        """The node's input ``index``, None where it is absent or left empty."""
        return self.node.input[index] if len(self.node.input) > index and self.node.input[index] else None

    def output(self, index: int) -> str | None:
        return self.node.output[index] if len(self.node.output) > index and self.node.output[index] else None

    def refuse(self, why: str) -> ModelError:
        if self.node.domain in STANDARD:
            return ModelError(f"node '{self.node.name}' ({self.node.op_type}) {why}: explain a layer after it, "
                              "or re-export the model at an opset that writes it as primitive operators")
        return ModelError(f"node '{self.node.name}' ({self.node.op_type}, ONNX Runtime's fused operator) {why}: "
                          "explain the model as exported, before ONNX Runtime's optimizations")


Decomposition = Callable[[Emitter], None]
#: (domain, operator) -> its decomposition
DECOMPOSITIONS: dict[tuple[str, str], Decomposition] = {}
STANDARD = ("", "ai.onnx")


def decomposition(*ops: str, domain: str = MICROSOFT):
    def register(fn: Decomposition) -> Decomposition:
        for op in ops:
            for name in (STANDARD if domain in STANDARD else (domain,)):
                DECOMPOSITIONS[(name, op)] = fn
        return fn
    return register


def decompose_fused_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place) with every node of ``DECOMPOSITIONS`` (com.microsoft ones,
    the standard Attention) replaced by standard operators; others are left for the gradient
    rules to name. Needs opset >= 17."""
    graph = model.graph
    blocked = next((node for node in graph.node if node.domain == NCHWC), None)
    if blocked is not None:
        raise ModelError(f"the model holds ONNX Runtime's NCHWc operators (node '{blocked.name}', "
                         f"{blocked.op_type} of domain {NCHWC}), a layout of the machine it was optimized on: "
                         "save it at ORT_ENABLE_EXTENDED or below, or explain the model as exported")
    if not any((node.domain, node.op_type) in DECOMPOSITIONS for node in graph.node):
        return model
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
    types = _float_types(graph)
    inferred = functools.lru_cache(maxsize=1)(lambda: _inferred(model))  # shape inference, once, if asked
    taken = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
    taken |= {init.name for init in graph.initializer} | {value.name for value in graph.input}
    nodes = []
    for node in graph.node:
        if (node.domain, node.op_type) not in DECOMPOSITIONS:
            nodes.append(node)
            continue
        emit = Emitter(graph, node, taken, opset, types.get(node.input[0], np.float32), inferred)
        DECOMPOSITIONS[(node.domain, node.op_type)](emit)
        nodes.extend(emit.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(node.domain == MICROSOFT for node in graph.node):
        kept = [entry for entry in model.opset_import if entry.domain != MICROSOFT]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model


def _float_types(graph: onnx.GraphProto) -> dict[str, np.dtype]:
    """The float type of each tensor that has one, followed through the graph in node order: ONNX
    shape inference stops at the fused operators, whose outputs have their first input's type."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    types = {value.name: value.type.tensor_type.elem_type for value in (*graph.input, *graph.value_info)}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Cast":
            made = next((a.i for a in node.attribute if a.name == "to"), None)
        elif node.op_type == "Constant":
            made = next((a.t.data_type for a in node.attribute if a.name == "value"), None)
        else:
            made = next((types[i] for i in node.input if types.get(i) in floats), None)
        for out in node.output:
            types.setdefault(out, made)
    return {name: helper.tensor_dtype_to_np_dtype(kind) for name, kind in types.items()
            if kind in floats and kind != onnx.TensorProto.BFLOAT16}


# -- activations fused into convolutions and matrix products ---------------------------------
def _activation(emit: Emitter, kind: str | None, params: list[float], x: str, y: str) -> None:
    """``y = kind(x)`` with ONNX Runtime's fused-activation parameters."""
    if not kind:
        emit("Identity", [x], y)
    elif kind in ("Relu", "Tanh", "Sigmoid"):
        emit(kind, [x], y)
    elif kind == "LeakyRelu":
        emit("LeakyRelu", [x], y, alpha=float(params[0]) if params else 0.01)
    elif kind == "HardSigmoid":
        emit("HardSigmoid", [x], y, alpha=float(params[0]), beta=float(params[1]))
    elif kind == "Clip":
        emit("Clip", [x, emit.constant(params[0]), emit.constant(params[1])], y)
    else:
        raise emit.refuse(f"has the fused activation {kind!r}, which onnxcam does not know")


@decomposition("FusedConv")
def _fused_conv(emit: Emitter) -> None:
    """act(Conv(X, W, B) + Z)."""
    inputs = [emit.input(0), emit.input(1)] + ([emit.input(2)] if emit.input(2) else [])
    y = emit("Conv", inputs, **emit.attrs("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
    if emit.input(3):
        y = emit("Add", [y, emit.input(3)])
    _activation(emit, emit.attr("activation"), list(emit.attr("activation_params", [])), y, emit.output(0))


@decomposition("FusedGemm")
def _fused_gemm(emit: Emitter) -> None:
    """act(Gemm(A, B, C)), the activation's parameters in activation_alpha, _beta."""
    inputs = [emit.input(0), emit.input(1)] + ([emit.input(2)] if emit.input(2) else [])
    y = emit("Gemm", inputs, **emit.attrs("alpha", "beta", "transA", "transB"))
    params = [emit.attr("activation_alpha", 0.01), emit.attr("activation_beta", 0.5)]
    kind = emit.attr("activation")
    if kind == "HardSigmoid":
        params = [emit.attr("activation_alpha", 0.2), emit.attr("activation_beta", 0.5)]
    _activation(emit, kind, params, y, emit.output(0))


@decomposition("FusedMatMul")
def _fused_matmul(emit: Emitter) -> None:
    """alpha op(A) op(B), op swapping the last two axes where transA or transB say: ONNX
    Runtime's MatMul fused with a Transpose or a scale (attention's Q K^T / sqrt(d))."""
    if emit.attr("transBatchA", 0) or emit.attr("transBatchB", 0):
        raise emit.refuse("moves its batch axes (transBatchA or transBatchB)")
    a, b = emit.input(0), emit.input(1)
    if emit.attr("transA", 0):
        a = _swap_last_two(emit, a)
    if emit.attr("transB", 0):
        b = _swap_last_two(emit, b)
    alpha = float(emit.attr("alpha", 1.0))
    if alpha == 1.0:
        emit("MatMul", [a, b], emit.output(0))
    else:
        emit("Mul", [emit("MatMul", [a, b]), emit.constant(alpha)], emit.output(0))


def _swap_last_two(emit: Emitter, name: str) -> str:
    rank = _rank(emit, name)
    if rank is None or rank < 2:
        raise emit.refuse(f"transposes '{name}', whose rank is not known")
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return emit("Transpose", [name], perm=perm)


# -- GELU and its approximations -------------------------------------------------------------
def _gelu(emit: Emitter, x: str, y: str) -> None:
    """0.5 x (1 + erf(x / sqrt 2))."""
    erf = emit("Erf", [emit("Mul", [x, emit.constant(1 / math.sqrt(2))])])
    half_x = emit("Mul", [x, emit.constant(0.5)])
    emit("Mul", [half_x, emit("Add", [erf, emit.constant(1.0)])], y)


def _tanh_gelu(emit: Emitter, x: str, y: str) -> None:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    cube = emit("Mul", [emit("Mul", [x, x]), x])
    inner = emit("Add", [x, emit("Mul", [cube, emit.constant(0.044715)])])
    tanh = emit("Tanh", [emit("Mul", [inner, emit.constant(math.sqrt(2 / math.pi))])])
    half_x = emit("Mul", [x, emit.constant(0.5)])
    emit("Mul", [half_x, emit("Add", [tanh, emit.constant(1.0)])], y)


def _with_bias(emit: Emitter, index: int = 1) -> str:
    bias = emit.input(index)
    return emit("Add", [emit.input(0), bias]) if bias else emit.input(0)


@decomposition("Gelu")
def _gelu_node(emit: Emitter) -> None:
    _gelu(emit, emit.input(0), emit.output(0))


@decomposition("BiasGelu")
def _bias_gelu(emit: Emitter) -> None:
    _gelu(emit, _with_bias(emit), emit.output(0))


@decomposition("FastGelu")
def _fast_gelu(emit: Emitter) -> None:
    _tanh_gelu(emit, _with_bias(emit), emit.output(0))


@decomposition("QuickGelu")
def _quick_gelu(emit: Emitter) -> None:
    """x sigmoid(alpha x)."""
    x = emit.input(0)
    gate = emit("Sigmoid", [emit("Mul", [x, emit.constant(emit.attr("alpha", 1.702))])])
    emit("Mul", [x, gate], emit.output(0))


# -- normalizations --------------------------------------------------------------------------
def _unsupported_statistics(emit: Emitter, *indices: int) -> None:
    if any(emit.output(i) for i in indices):
        raise emit.refuse("has its mean or inverse standard deviation read by other nodes")


@decomposition("SkipLayerNormalization")
def _skip_layer_norm(emit: Emitter) -> None:
    """s = input + skip (+ bias); LayerNormalization(s, gamma, beta) on the last axis; output 3 is s."""
    _unsupported_statistics(emit, 1, 2)
    total = _skip_sum(emit, bias=4)
    gamma, beta = emit.input(2), emit.input(3)
    emit("LayerNormalization", [total, gamma] + ([beta] if beta else []), emit.output(0),
         axis=-1, epsilon=float(emit.attr("epsilon", 1e-12)))


def _skip_sum(emit: Emitter, bias: int) -> str:
    """input + skip (+ the input ``bias``), under the name of the node's output 3 where it has one:
    the residual stream, a ViT block's input, keeps the name the optimizer gave it."""
    if not emit.input(bias):
        return emit("Add", [emit.input(0), emit.input(1)], emit.output(3))
    return emit("Add", [emit("Add", [emit.input(0), emit.input(1)]), emit.input(bias)], emit.output(3))


def _rms_norm(emit: Emitter, x: str, scale: str, y: str, axis: int, epsilon: float) -> None:
    """x / sqrt(mean(x^2 over the axes from ``axis`` on) + epsilon) * scale."""
    rank = None if axis == -1 else _rank(emit, x)  # shape inference only for another axis
    if axis == -1 or (rank is not None and axis % rank == rank - 1):
        axes = [-1]
    elif rank is not None:
        axes = list(range(axis % rank, rank))
    else:
        raise emit.refuse(f"normalizes from axis {axis} of an input of unknown rank")
    mean = _reduce_mean(emit, emit("Mul", [x, x]), axes)
    norm = emit("Div", [x, emit("Sqrt", [emit("Add", [mean, emit.constant(epsilon)])])])
    emit("Mul", [norm, scale], y)


def _reduce_mean(emit: Emitter, t: str, axes: list[int]) -> str:
    """ReduceMean over ``axes``, keeping them: an input from opset 18 on, an attribute before."""
    if emit.opset >= 18:
        return emit("ReduceMean", [t, emit.constant(axes, np.int64)], keepdims=1)
    return emit("ReduceMean", [t], axes=axes, keepdims=1)


def _rank(emit: Emitter, name: str) -> int | None:
    tensor = emit.inferred().get(name)
    return len(tensor.shape.dim) if tensor is not None and tensor.HasField("shape") else None


def _dim(emit: Emitter, name: str, axis: int) -> int | None:
    """Dim ``axis`` of ``name`` where shape inference knows it as a number."""
    tensor = emit.inferred().get(name)
    if tensor is None or not tensor.HasField("shape") or len(tensor.shape.dim) <= axis:
        return None
    dim = tensor.shape.dim[axis]
    return dim.dim_value if dim.HasField("dim_value") else None


def _elem_type(emit: Emitter, name: str) -> int | None:
    tensor = emit.inferred().get(name)
    return tensor.elem_type if tensor is not None and tensor.elem_type else None


def _inferred(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """The type (and shape, where known) of each tensor ONNX shape inference can tell, before
    the fused operators (unknown to it) are rewritten: their inputs usually come from standard
    ones."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - then nothing is known, and the decomposition that needs it says so
        return {}
    known = {value.name: value.type.tensor_type for value in (*inferred.input, *inferred.value_info, *inferred.output)}
    known.update({init.name: onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)).tensor_type
                  for init in inferred.initializer})
    return known


@decomposition("SkipSimplifiedLayerNormalization")
def _skip_rms_norm(emit: Emitter) -> None:
    _unsupported_statistics(emit, 1, 2)
    total = _skip_sum(emit, bias=3)
    _rms_norm(emit, total, emit.input(2), emit.output(0), -1, float(emit.attr("epsilon", 1e-12)))


@decomposition("SimplifiedLayerNormalization")
def _rms_norm_node(emit: Emitter) -> None:
    _unsupported_statistics(emit, 1)
    _rms_norm(emit, emit.input(0), emit.input(1), emit.output(0), int(emit.attr("axis", -1)),
              float(emit.attr("epsilon", 1e-5)))


@decomposition("RMSNormalization", domain="")
def _standard_rms_norm(emit: Emitter) -> None:
    """ONNX's RMSNormalization (opset 23, torch's nn.RMSNorm from the dynamo exporter)."""
    _rms_norm(emit, emit.input(0), emit.input(1), emit.output(0), int(emit.attr("axis", -1)),
              float(emit.attr("epsilon", 1e-5)))


@decomposition("GroupNormalization", domain="")
def _group_norm(emit: Emitter) -> None:
    """ONNX's GroupNormalization (torch's nn.GroupNorm from the dynamo exporter at opset 21 and
    above): each image's channels in ``num_groups`` groups, each normalized over its channels and
    positions, then scaled and shifted per channel (per group before opset 21)."""
    x, scale, bias = emit.input(0), emit.input(1), emit.input(2)
    groups, epsilon = int(emit.attr("num_groups")), float(emit.attr("epsilon", 1e-5))
    grouped = emit("Reshape", [x, emit.constant([0, groups, -1], np.int64)])
    centered = emit("Sub", [grouped, _reduce_mean(emit, grouped, [2])])
    variance = _reduce_mean(emit, emit("Mul", [centered, centered]), [2])
    normed = emit("Div", [centered, emit("Sqrt", [emit("Add", [variance, emit.constant(epsilon)])])])
    if emit.opset >= 21:  # per channel, on the input's own shape
        rank = _rank(emit, x)
        if rank is None:
            raise emit.refuse("normalizes an input of unknown rank")
        column = emit.constant([-1] + [1] * (rank - 2), np.int64)
        normed = emit("Reshape", [normed, emit("Shape", [x])])
        scale, bias = emit("Reshape", [scale, column]), emit("Reshape", [bias, column])
        emit("Add", [emit("Mul", [normed, scale]), bias], emit.output(0))
        return
    column = emit.constant([-1, 1], np.int64)  # per group, on the grouped view
    shifted = emit("Add", [emit("Mul", [normed, emit("Reshape", [scale, column])]), emit("Reshape", [bias, column])])
    emit("Reshape", [shifted, emit("Shape", [x])], emit.output(0))


# -- attention -------------------------------------------------------------------------------
@decomposition("Attention")
def _attention(emit: Emitter) -> None:
    """softmax(Q K^T * scale) V per head, Q, K, V from one MatMul of the input with the packed
    weights plus bias: ViT's self-attention as the transformers optimizer fuses it (no mask, no
    past state, not causal)."""
    extra = [i for i in range(3, len(emit.node.input)) if emit.input(i)]
    if extra or emit.attr("unidirectional", 0) or emit.attr("do_rotary", 0) or emit.output(1):
        raise emit.refuse("has a mask, past state, rotary embedding or causal masking, which onnxcam does not "
                          "rewrite")
    heads = int(emit.attr("num_heads"))
    weights = _initializer_dims(emit, emit.input(1))
    if weights is None or len(weights) != 2:
        raise emit.refuse("has weights that are not a constant matrix")
    sizes = list(emit.attr("qkv_hidden_sizes", [])) or [weights[1] // 3] * 3
    scale = emit.attr("scale", None) or 1 / math.sqrt(sizes[0] // heads)
    qkv = emit("MatMul", [emit.input(0), emit.input(1)])
    if emit.input(2):
        qkv = emit("Add", [qkv, emit.input(2)])
    q, k, v = emit.multi("Split", [qkv, emit.constant(sizes, np.int64)], ["", "", ""], axis=-1)
    _scaled_dot_product(emit, q, k, v, heads, scale)


@decomposition("MultiHeadAttention")
def _multi_head_attention(emit: Emitter) -> None:
    """The same with query, key and value given apart ([N, tokens, hidden] each), and an optional
    bias [3 hidden] added to them: no packed inputs, masks, past state or causal masking."""
    extra = [i for i in range(4, len(emit.node.input)) if emit.input(i)]
    if extra or not (emit.input(1) and emit.input(2)) or emit.attr("unidirectional", 0) or \
            any(emit.output(i) for i in (1, 2, 3)):
        raise emit.refuse("has packed inputs, a mask, past state or causal masking, which onnxcam does not "
                          "rewrite")
    q, k, v = emit.input(0), emit.input(1), emit.input(2)
    heads, hidden = int(emit.attr("num_heads")), _hidden_size(emit, q)
    if emit.input(3):
        sizes = _initializer_dims(emit, emit.input(3))
        if sizes is None or len(sizes) != 1 or sizes[0] % 3:
            raise emit.refuse("has a bias that is not a constant vector of three equal parts")
        hidden = sizes[0] // 3
        parts = emit.constant([hidden] * 3, np.int64)
        q, k, v = (emit("Add", [t, b]) for t, b in zip((q, k, v), emit.multi("Split", [emit.input(3), parts],
                                                                               ["", "", ""], axis=0)))
    scale = emit.attr("scale", None)
    if not scale and not hidden:
        raise emit.refuse("has no scale, and its query's size is not known from a bias or weights")
    _scaled_dot_product(emit, q, k, v, heads, scale or 1 / math.sqrt(hidden // heads))


@decomposition("Attention", domain="")
def _standard_attention(emit: Emitter) -> None:
    """ONNX's Attention (opset 23): softmax(Q K^T scale + mask) V, Q, K, V either [N, heads,
    tokens, size] or [N, tokens, heads * size] with ``q_num_heads`` and ``kv_num_heads``; the
    mask boolean (False: not attended) or added. No causal masking, past state, soft cap, extra
    outputs, or fewer key/value heads than query heads (grouped-query attention)."""
    if any(emit.input(i) for i in range(4, len(emit.node.input))) or any(emit.output(i) for i in (1, 2, 3)):
        raise emit.refuse("has past key/value state or extra outputs, which onnxcam does not rewrite")
    if emit.attr("is_causal", 0) or emit.attr("softcap", 0.0):
        raise emit.refuse("has causal masking or a soft cap, which onnxcam does not rewrite")
    q, k, v = emit.input(0), emit.input(1), emit.input(2)
    rank = _rank(emit, q)
    q_heads, kv_heads = emit.attr("q_num_heads"), emit.attr("kv_num_heads")
    if rank is None:
        rank = 3 if q_heads else 4
    if rank == 3:
        if not q_heads or not kv_heads or q_heads != kv_heads:
            raise emit.refuse("has 3-D inputs without equal q_num_heads and kv_num_heads (grouped-query attention)")

        def heads_first(t: str) -> str:
            return emit("Transpose", [emit("Reshape", [t, emit.constant([0, 0, q_heads, -1], np.int64)])],
                        perm=[0, 2, 1, 3])
        q, k, v = heads_first(q), heads_first(k), heads_first(v)
    elif rank != 4:
        raise emit.refuse(f"has {rank}-D inputs (3-D or 4-D expected)")
    elif _dim(emit, k, 1) not in (None, 1, _dim(emit, q, 1)) and _dim(emit, q, 1) is not None:
        raise emit.refuse("has fewer key/value heads than query heads (grouped-query attention)")
    scores = emit("MatMul", [q, emit("Transpose", [k], perm=[0, 1, 3, 2])])
    scale = emit.attr("scale", None)
    if scale is None:  # 1 / sqrt(head size), the size read off the query at run time
        size = emit("Cast", [emit("Shape", [q], start=-1)], to=helper.np_dtype_to_tensor_dtype(np.dtype(emit.dtype)))
        scaled = emit("Div", [scores, emit("Sqrt", [size])])
    else:
        scaled = emit("Mul", [scores, emit.constant(scale)])
    mask = emit.input(3)
    if mask is not None:
        kind = _elem_type(emit, mask)
        if kind is None:
            raise emit.refuse("has a mask of unknown type (boolean or added?)")
        if kind == onnx.TensorProto.BOOL:
            scaled = emit("Where", [mask, scaled, emit.constant(-np.inf)])
        else:
            scaled = emit("Add", [scaled, mask])
    context = emit("MatMul", [emit("Softmax", [scaled], axis=-1), v])
    if rank == 3:
        context = emit("Reshape", [emit("Transpose", [context], perm=[0, 2, 1, 3]),
                                   emit.constant([0, 0, -1], np.int64)])
    emit("Identity", [context], emit.output(0))


def _hidden_size(emit: Emitter, name: str) -> int | None:
    """The last dim of ``name`` where a MatMul by constant weights makes it (through an Add)."""
    producers = {out: node for node in emit.graph.node for out in node.output}
    node = producers.get(name)
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
    dims = _initializer_dims(emit, node.input[1]) if node is not None and node.op_type == "MatMul" else None
    return dims[-1] if dims else None


def _scaled_dot_product(emit: Emitter, q: str, k: str, v: str, heads: int, scale: float) -> None:
    """Node output 0 = softmax(Q K^T scale) V over ``heads`` heads of [N, tokens, hidden] Q, K, V."""
    def heads_first(t: str, perm: list[int]) -> str:
        split = emit("Reshape", [t, emit.constant([0, 0, heads, -1], np.int64)])
        return emit("Transpose", [split], perm=perm)

    scores = emit("MatMul", [heads_first(q, [0, 2, 1, 3]), heads_first(k, [0, 2, 3, 1])])
    probabilities = emit("Softmax", [emit("Mul", [scores, emit.constant(scale)])], axis=-1)
    context = emit("Transpose", [emit("MatMul", [probabilities, heads_first(v, [0, 2, 1, 3])])], perm=[0, 2, 1, 3])
    emit("Reshape", [context, emit.constant([0, 0, -1], np.int64)], emit.output(0))


def _initializer_dims(emit: Emitter, name: str | None) -> list[int] | None:
    for init in emit.graph.initializer:
        if init.name == name:
            return list(init.dims)
    return None
