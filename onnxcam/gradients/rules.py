"""The gradient rule of every supported ONNX operator: one small function each, one table.

A rule receives the emitter, the forward node and the gradient of each node output (None where an
output carries no gradient) and returns one gradient per node input (None for "none needed", e.g.
weights). Rules only emit standard ONNX ops (opset >= 17, the floor that model preparation sets),
so any runtime can run the result. Forward tensors (inputs and outputs) are reused, never recomputed,
except where a rule needs a quantity the forward graph does not expose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcam.errors import UnsupportedOperatorError
from onnxcam.gradients.emitter import Emitter, constant_value, static_shape, stays_on_disk
from onnxcam.gradients.resize import resize_matrices

Rule = Callable[[Emitter, gs.Node, list], list]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def _x(node: gs.Node) -> gs.Tensor:
    return node.inputs[0]


def _y(node: gs.Node) -> gs.Tensor:
    return node.outputs[0]


def _present(node: gs.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i].name != ""


def _unsupported(node: gs.Node, why: str):
    raise UnsupportedOperatorError(f"operator {node.op} (node '{node.name}'): {why}")


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------------------------------------
# Structural and identity-like ops
# ---------------------------------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(em, node, dy):
    return [dy[0]] + [None] * (len(node.inputs) - 1)


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(em, node, dy):
    return [em.reshape_like(dy[0], _x(node))] + [None] * (len(node.inputs) - 1)


@rule("Cast", "CastLike")
def _cast(em, node, dy):
    """dy cast back to the input's float type (CastLike's second input only lends its type)."""
    dtype = _x(node).dtype
    rest = [None] * (len(node.inputs) - 1)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
        return [None] + rest
    return [em.op("Cast", dy[0], to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))] + rest


@rule("Transpose")
def _transpose(em, node, dy):
    rank = len(static_shape(_x(node)))
    perm = node.attrs.get("perm", list(range(rank))[::-1])
    return [em.op("Transpose", dy[0], perm=[int(i) for i in np.argsort(perm)])]


@rule("Expand")
def _expand(em, node, dy):
    return [em.unbroadcast(dy[0], _x(node), _y(node)), None]


@rule("Concat")
def _concat(em, node, dy):
    rank = len(static_shape(_y(node)))
    axis = _axis(node.attrs["axis"], rank)
    sizes = [static_shape(t)[axis] for t in node.inputs]
    if not all(isinstance(s, int) for s in sizes):
        _unsupported(node, f"concatenation along axis {axis} of non-static size {sizes}")
    parts = em.op("Split", dy[0], em.ints(sizes), axis=axis, outputs=len(sizes))
    return list(parts) if len(sizes) > 1 else [parts]


@rule("Split")
def _split(em, node, dy):
    rank = len(static_shape(_x(node)))
    axis = _axis(node.attrs.get("axis", 0), rank)
    parts = [g if g is not None else em.zeros_like(out) for g, out in zip(dy, node.outputs)]
    return [em.op("Concat", *parts, axis=axis)] + [None] * (len(node.inputs) - 1)


def _index_probe(em: Emitter, node: gs.Node, dy, pad_value: bool = False):
    """Gradient of a pure data-movement op (Slice, Gather, Pad...): apply the op itself to a tensor
    of flat element indices, then scatter-add ``dy`` back to where each output element came from.
    Exact for any attribute combination the runtime supports, since the runtime does the indexing.
    """
    x = _x(node)
    size = em.op("Reshape", em.op("Size", x), em.ints([1]))
    indices = em.op("Reshape", em.op("Range", em.const(0, dtype=np.int64),
                                     em.op("Size", x), em.const(1, dtype=np.int64)), em.shape(x))
    extra = list(node.inputs[1:])
    if pad_value:  # padded positions point at one extra, discarded slot
        extra = [extra[0], em.op("Size", x)] + extra[2:] if len(extra) >= 1 else extra
    moved = em.op(node.op, indices, *extra, **node.attrs)
    buffer_len = em.op("Add", size, em.ints([1])) if pad_value else size
    zeros = em.zeros(buffer_len)
    flat_dy = em.op("Reshape", dy[0], em.ints([-1]))
    scattered = em.op("ScatterElements", zeros, em.op("Reshape", moved, em.ints([-1])), flat_dy,
                      axis=0, reduction="add")
    if pad_value:
        scattered = em.op("Slice", scattered, em.ints([0]), size, em.ints([0]))
    return [em.reshape_like(scattered, x)] + [None] * (len(node.inputs) - 1)


@rule("Slice", "Gather", "GatherElements", "GatherND", "Tile")
def _selection(em, node, dy):
    return _index_probe(em, node, dy)


@rule("SpaceToDepth")
def _space_to_depth(em, node, dy):
    """A permutation whose inverse is DepthToSpace in DCR order."""
    return [em.op("DepthToSpace", dy[0], blocksize=node.attrs["blocksize"], mode="DCR")]


@rule("DepthToSpace")
def _depth_to_space(em, node, dy):
    """A permutation: DCR's inverse is SpaceToDepth; CRD's (PixelShuffle) is its own reshape and
    transpose undone."""
    b = int(node.attrs["blocksize"])
    mode = node.attrs.get("mode", "DCR")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "DCR":
        return [em.op("SpaceToDepth", dy[0], blocksize=b)]
    _, c, h, w = static_shape(_x(node))
    if not all(isinstance(d, int) for d in (c, h, w)):
        _unsupported(node, f"CRD mode needs static channels and sizes, got {static_shape(_x(node))}")
    # forward: [N, C/b^2, b, b, H, W] -> perm (0, 1, 4, 2, 5, 3) -> [N, C/b^2, H, b, W, b]
    blocks = em.op("Reshape", dy[0], em.ints([0, c // (b * b), h, b, w, b]))
    return [em.op("Reshape", em.op("Transpose", blocks, perm=[0, 1, 3, 5, 2, 4]), em.ints([0, c, h, w]))]


@rule("Pad")
def _pad(em, node, dy):
    mode = node.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    pads = constant_value(node.inputs[1]) if _present(node, 1) else None
    if mode == "constant" and pads is not None and pads.min() >= 0:
        return _unpad(em, node, dy, pads)
    return _index_probe(em, node, dy, pad_value=(mode == "constant"))


def _unpad(em, node, dy, pads):
    """Constant padding with non-negative pads: the gradient is dy with the padding sliced off
    (cheaper than the general index probe, which scatters every element)."""
    rank = len(static_shape(_x(node)))
    axes = constant_value(node.inputs[3]).tolist() if _present(node, 3) else list(range(rank))
    half = len(pads) // 2
    begin, end = pads[:half].tolist(), pads[half:].tolist()
    ends = [-e if e > 0 else np.iinfo(np.int64).max for e in end]
    dx = em.op("Slice", dy[0], em.ints(begin), em.ints(ends), em.ints([_axis(int(a), rank) for a in axes]))
    return [dx] + [None] * (len(node.inputs) - 1)


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic (with NumPy broadcasting)
# ---------------------------------------------------------------------------------------------

@rule("Add", "Sum")
def _add(em, node, dy):
    y = _y(node)
    return [em.unbroadcast(dy[0], t, y) if em.wants(t) else None for t in node.inputs]


@rule("Sub")
def _sub(em, node, dy):
    a, b = node.inputs
    y = _y(node)
    return [em.unbroadcast(dy[0], a, y) if em.wants(a) else None,
            em.unbroadcast(em.op("Neg", dy[0]), b, y) if em.wants(b) else None]


@rule("Mul")
def _mul(em, node, dy):
    a, b = node.inputs
    y = _y(node)
    return [em.unbroadcast(em.op("Mul", dy[0], b), a, y) if em.wants(a) else None,
            em.unbroadcast(em.op("Mul", dy[0], a), b, y) if em.wants(b) else None]


@rule("Div")
def _div(em, node, dy):
    a, b = node.inputs
    y = _y(node)
    da = em.op("Div", dy[0], b)
    db = em.op("Neg", em.op("Mul", da, y)) if em.wants(b) else None
    return [em.unbroadcast(da, a, y) if em.wants(a) else None,
            em.unbroadcast(db, b, y) if db is not None else None]


@rule("Where")
def _where(em, node, dy):
    """``dy`` goes to ``a`` where the condition holds and to ``b`` elsewhere; the boolean condition
    carries none (dynamo's attention writes ``Where(IsNaN(p), 0, p)`` after the Softmax)."""
    cond, a, b = node.inputs
    y = _y(node)
    taken = em.to_float(cond)
    da = em.unbroadcast(em.op("Mul", dy[0], taken), a, y) if em.wants(a) else None
    db = (em.unbroadcast(em.op("Mul", dy[0], em.op("Sub", em.const(1.0), taken)), b, y)
          if em.wants(b) else None)
    return [None, da, db]


@rule("Neg")
def _neg(em, node, dy):
    return [em.op("Neg", dy[0])]


@rule("Pow")
def _pow(em, node, dy):
    x, p = node.inputs
    y = _y(node)
    exponent = constant_value(p)
    dx = None
    if em.wants(x):
        if exponent is not None and exponent.size == 1:
            e = float(exponent.reshape(()))
            local = em.op("Mul", em.const(e), em.op("Pow", x, em.const(e - 1.0)))
        else:
            local = em.op("Mul", p, em.op("Pow", x, em.op("Sub", p, em.const(1.0))))
        dx = em.unbroadcast(em.op("Mul", dy[0], local), x, y)
    dp = None
    if em.wants(p):
        dp = em.unbroadcast(em.op("Mul", dy[0], em.op("Mul", y, em.op("Log", x))), p, y)
    return [dx, dp]


@rule("Max", "Min")
def _max_min(em, node, dy):
    """dy goes to the operands equal to the output, shared evenly among ties (as torch.maximum
    and torch.amax share it); TensorFlow's Relu6 and clamps export as Max and Min."""
    y = _y(node)
    hits = [em.to_float(em.op("Equal", t, y)) for t in node.inputs]
    share = em.op("Div", dy[0], em.sum_all(hits)) if len(hits) > 1 else dy[0]
    return [em.unbroadcast(em.op("Mul", share, hit), t, y) if em.wants(t) else None
            for t, hit in zip(node.inputs, hits)]


@rule("Mean")
def _mean(em, node, dy):
    y = _y(node)
    share = em.op("Mul", dy[0], em.const(1.0 / len(node.inputs)))
    return [em.unbroadcast(share, t, y) if em.wants(t) else None for t in node.inputs]


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

@rule("Relu")
def _relu(em, node, dy):
    return [em.mask(em.op("Greater", _y(node), em.const(0.0)), dy[0])]


@rule("LeakyRelu")
def _leaky_relu(em, node, dy):
    """dy * max(Cast(x > 0), alpha), exact for 0 <= alpha <= 1 (the usual slopes) and twice as
    fast as a Where (ONNX Runtime's CPU Where runs on one thread); other slopes take the Where."""
    alpha = node.attrs.get("alpha", 0.01)
    positive = em.op("Greater", _x(node), em.const(0.0))
    if 0.0 <= alpha <= 1.0:
        return [em.op("Mul", dy[0], em.op("Max", em.to_float(positive), em.const(alpha)))]
    return [em.where(positive, dy[0], em.op("Mul", dy[0], em.const(alpha)))]


@rule("PRelu")
def _prelu(em, node, dy):
    """dy * (slope + Cast(x > 0) * (1 - slope)): no Where (see LeakyRelu); 1 - slope is the
    size of the slope, per channel."""
    x, slope = node.inputs
    if em.wants(slope):
        _unsupported(node, "the gradient with respect to the slope is not supported")
    positive = em.to_float(em.op("Greater", x, em.const(0.0)))
    local = em.op("Add", em.op("Mul", positive, em.op("Sub", em.const(1.0), slope)), slope)
    return [em.op("Mul", dy[0], local), None]


@rule("Elu")
def _elu(em, node, dy):
    alpha = node.attrs.get("alpha", 1.0)
    negative = em.op("Mul", dy[0], em.op("Add", _y(node), em.const(alpha)))
    return [em.where(em.op("Greater", _x(node), em.const(0.0)), dy[0], negative)]


@rule("Clip")
def _clip(em, node, dy):
    """dy where min < x < max, read off the output (min < y < max holds exactly there), so
    that x keeps its single consumer and ONNX Runtime can fuse a Conv with the Clip after it.
    At x = min or x = max exactly the gradient is 0, as PyTorch's hardtanh/ReLU6 give it."""
    y = _y(node)
    inside = None
    for i, compare in ((1, "Greater"), (2, "Less")):
        if _present(node, i):
            cond = em.op(compare, y, node.inputs[i])
            inside = cond if inside is None else em.op("And", inside, cond)
    dx = dy[0] if inside is None else em.mask(inside, dy[0])
    return [dx] + [None] * (len(node.inputs) - 1)


@rule("Sigmoid")
def _sigmoid(em, node, dy):
    y = _y(node)
    return [em.op("Mul", dy[0], em.op("Mul", y, em.op("Sub", em.const(1.0), y)))]


@rule("HardSigmoid")
def _hard_sigmoid(em, node, dy):
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    z = em.op("Add", em.op("Mul", _x(node), em.const(alpha)), em.const(beta))
    inside = em.op("And", em.op("Greater", z, em.const(0.0)), em.op("Less", z, em.const(1.0)))
    return [em.mask(inside, em.op("Mul", dy[0], em.const(alpha)))]


@rule("HardSwish")
def _hard_swish(em, node, dy):
    """y = x * h(x) with h = HardSigmoid(x; 1/6, 1/2), so y' = h + x/6 where |x| < 3 (0 below
    -3, 1 above 3, (2x + 3)/6 between), built without Where: ONNX Runtime's CPU Where runs on
    one thread, and this form took 25% less time than the piecewise one (MobileNetV3's backward
    has one per block). At x = -3 and x = 3 exactly it takes the outer side's slope."""
    x = _x(node)
    h = em.op("HardSigmoid", x, alpha=1.0 / 6.0, beta=0.5)
    inner = em.mask(em.op("Less", em.op("Abs", x), em.const(3.0)), em.op("Mul", x, em.const(1.0 / 6.0)))
    return [em.op("Mul", dy[0], em.op("Add", h, inner))]


@rule("Tanh")
def _tanh(em, node, dy):
    y = _y(node)
    return [em.op("Mul", dy[0], em.op("Sub", em.const(1.0), em.op("Mul", y, y)))]


@rule("Softplus")
def _softplus(em, node, dy):
    return [em.op("Mul", dy[0], em.op("Sigmoid", _x(node)))]


@rule("Mish")
def _mish(em, node, dy):
    """y = x tanh(softplus(x)): y' = t + x sigmoid(x) (1 - t^2) with t = tanh(softplus(x))."""
    x = _x(node)
    t = em.op("Tanh", em.op("Softplus", x))
    slope = em.op("Mul", em.op("Mul", x, em.op("Sigmoid", x)), em.op("Sub", em.const(1.0), em.op("Mul", t, t)))
    return [em.op("Mul", dy[0], em.op("Add", t, slope))]


@rule("Selu")
def _selu(em, node, dy):
    """gamma above 0, y + gamma alpha (= gamma alpha e^x) below."""
    alpha, gamma = node.attrs.get("alpha", 1.67326319217681884765625), node.attrs.get("gamma", 1.05070102214813232421875)
    negative = em.op("Mul", dy[0], em.op("Add", _y(node), em.const(gamma * alpha)))
    return [em.where(em.op("Greater", _x(node), em.const(0.0)), em.op("Mul", dy[0], em.const(gamma)), negative)]


@rule("Celu")
def _celu(em, node, dy):
    """1 above 0, y / alpha + 1 (= e^(x / alpha)) below."""
    alpha = node.attrs.get("alpha", 1.0)
    negative = em.op("Mul", dy[0], em.op("Add", em.op("Mul", _y(node), em.const(1.0 / alpha)), em.const(1.0)))
    return [em.where(em.op("Greater", _x(node), em.const(0.0)), dy[0], negative)]


@rule("Softsign")
def _softsign(em, node, dy):
    root = em.op("Add", em.op("Abs", _x(node)), em.const(1.0))
    return [em.op("Div", dy[0], em.op("Mul", root, root))]


@rule("ThresholdedRelu")
def _thresholded_relu(em, node, dy):
    return [em.mask(em.op("Greater", _x(node), em.const(node.attrs.get("alpha", 1.0))), dy[0])]


@rule("Erf")
def _erf(em, node, dy):
    x = _x(node)
    gauss = em.op("Exp", em.op("Neg", em.op("Mul", x, x)))
    return [em.op("Mul", dy[0], em.op("Mul", gauss, em.const(2.0 / math.sqrt(math.pi))))]


@rule("Gelu")
def _gelu(em, node, dy):
    x = _x(node)
    approximate = node.attrs.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = em.op("Mul", x, x)
        inner = em.op("Mul", em.const(c), em.op("Add", x, em.op("Mul", em.const(0.044715),
                                                                  em.op("Mul", x2, x))))
        t = em.op("Tanh", inner)
        d_inner = em.op("Mul", em.const(c), em.op("Add", em.const(1.0),
                                                   em.op("Mul", em.const(3 * 0.044715), x2)))
        left = em.op("Mul", em.const(0.5), em.op("Add", em.const(1.0), t))
        right = em.op("Mul", em.op("Mul", em.const(0.5), x),
                      em.op("Mul", em.op("Sub", em.const(1.0), em.op("Mul", t, t)), d_inner))
        slope = em.op("Add", left, right)
    else:  # x * Phi(x): slope Phi(x) + x * phi(x)
        cdf = em.op("Mul", em.const(0.5), em.op("Add", em.const(1.0),
                                                 em.op("Erf", em.op("Mul", x, em.const(1 / math.sqrt(2))))))
        pdf = em.op("Mul", em.const(1 / math.sqrt(2 * math.pi)),
                    em.op("Exp", em.op("Mul", em.op("Mul", x, x), em.const(-0.5))))
        slope = em.op("Add", cdf, em.op("Mul", x, pdf))
    return [em.op("Mul", dy[0], slope)]


@rule("Exp")
def _exp(em, node, dy):
    return [em.op("Mul", dy[0], _y(node))]


@rule("Log")
def _log(em, node, dy):
    return [em.op("Div", dy[0], _x(node))]


@rule("Sqrt")
def _sqrt(em, node, dy):
    return [em.op("Div", em.op("Mul", dy[0], em.const(0.5)), _y(node))]


@rule("Reciprocal")
def _reciprocal(em, node, dy):
    y = _y(node)
    return [em.op("Neg", em.op("Mul", dy[0], em.op("Mul", y, y)))]


@rule("Abs")
def _abs(em, node, dy):
    return [em.op("Mul", dy[0], em.op("Sign", _x(node)))]


@rule("Softmax")
def _softmax(em, node, dy):
    y = _y(node)
    axis = node.attrs.get("axis", -1)
    weighted = em.reduce_sum(em.op("Mul", dy[0], y), [axis])
    return [em.op("Mul", y, em.op("Sub", dy[0], weighted))]


@rule("LogSoftmax")
def _log_softmax(em, node, dy):
    axis = node.attrs.get("axis", -1)
    total = em.reduce_sum(dy[0], [axis])
    return [em.op("Sub", dy[0], em.op("Mul", em.op("Exp", _y(node)), total))]


# ---------------------------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------------------------

@rule("Gemm")
def _gemm(em, node, dy):
    a, b = node.inputs[:2]
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    g = dy[0]
    da = db = dc = None
    if em.wants(a):
        if trans_a:
            da = em.op("Gemm", b, g, alpha=alpha, transA=trans_b, transB=1)
        else:
            da = em.op("Gemm", g, b, alpha=alpha, transB=1 - trans_b)
    if em.wants(b):
        if trans_b:
            db = em.op("Gemm", g, a, alpha=alpha, transA=1, transB=trans_a)
        else:
            db = em.op("Gemm", a, g, alpha=alpha, transA=1 - trans_a)
    if _present(node, 2) and em.wants(node.inputs[2]):
        dc = em.unbroadcast(em.op("Mul", g, em.const(beta)), node.inputs[2], _y(node))
    return [da, db, dc][:len(node.inputs)]


@rule("Einsum")
def _einsum(em, node, dy):
    """An operand's gradient is the einsum of the output's gradient with the other operands, back
    to the operand's letters (``ij,jk->ik``: ``ik,jk->ij`` for the first); a letter only that
    operand has was summed over, so the gradient is spread back along it. Needs an explicit
    output, no ellipsis and no letter twice in a term."""
    equation = node.attrs["equation"]
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "..." in equation or "->" not in equation:
        _unsupported(node, f"equation '{equation}' needs an explicit output and no ellipsis")
    terms, output = equation.split("->")
    terms = terms.split(",")
    grads = []
    for i, (term, operand) in enumerate(zip(terms, node.inputs)):
        if not em.wants(operand):
            grads.append(None)
            continue
        others = [t for j, t in enumerate(terms) if j != i]
        if len(set(term)) != len(term):
            _unsupported(node, f"operand {i} ('{term}') of '{equation}' repeats a letter (a diagonal)")
        seen = set(output).union(*others)
        kept = "".join(letter for letter in term if letter in seen)
        back = ",".join([output, *others]) + "->" + kept
        grad = em.op("Einsum", dy[0], *(t for j, t in enumerate(node.inputs) if j != i), equation=back)
        if kept != term:  # summed letters of its own: spread the gradient back along them
            summed = [k for k, letter in enumerate(term) if letter not in seen]
            grad = em.op("Expand", em.op("Unsqueeze", grad, em.ints(summed)), em.shape(operand))
        grads.append(grad)
    return grads


def _swap_last_two(em, t, rank):
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return em.op("Transpose", t, perm=perm)


@rule("MatMul")
def _matmul(em, node, dy):
    a, b = node.inputs
    ra, rb = len(static_shape(a)), len(static_shape(b))
    g = dy[0]
    # Promote 1-D operands to matrices, as numpy.matmul does, so one formula serves all ranks.
    a2 = em.op("Unsqueeze", a, em.ints([0])) if ra == 1 else a
    b2 = em.op("Unsqueeze", b, em.ints([-1])) if rb == 1 else b
    if ra == 1:
        g = em.op("Unsqueeze", g, em.ints([-2]))
    if rb == 1:
        g = em.op("Unsqueeze", g, em.ints([-1]))
    ra2, rb2 = max(ra, 2), max(rb, 2)
    out_rank = max(ra2, rb2)
    result = []
    for operand, other, other_rank, left in ((a, b2, rb2, True), (b, a2, ra2, False)):
        if not em.wants(operand):
            result.append(None)
            continue
        other_t = _swap_last_two(em, other, other_rank)
        d = em.op("MatMul", g, other_t) if left else em.op("MatMul", other_t, g)
        own_rank = ra2 if left else rb2
        if out_rank > own_rank:
            d = em.reduce_sum(d, list(range(out_rank - own_rank)), keepdims=False)
        own_shape = static_shape(operand if len(static_shape(operand)) > 1 else (a2 if left else b2))
        result.append(_reduce_batch_broadcast(em, d, own_shape, operand))
    return result


def _reduce_batch_broadcast(em, d, own_shape, operand):
    """Sum the batch axes where the operand had size 1 but the product broadcast it."""
    axes = [i for i, n in enumerate(own_shape[:-2]) if n == 1]
    if axes:
        d = em.reduce_sum(d, axes, keepdims=True)
    return em.reshape_like(d, operand)


# ---------------------------------------------------------------------------------------------
# Convolution and pooling
# ---------------------------------------------------------------------------------------------

def _explicit_pads(node: gs.Node, spatial: list, kernel: list, strides: list, dilations: list):
    """Explicit (begin, end) pads per spatial axis, auto_pad resolved as the ONNX spec defines it."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    n = len(spatial)
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attrs.get("pads", [0] * (2 * n)))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def _transpose_geometry(node, x, y, kernel):
    """Strides, dilations and the ConvTranspose pads/output_padding that map y's grid back onto
    x's exactly (never ``output_shape``: the runtime recomputes pads from it, wrongly for
    asymmetric cases)."""
    spatial = static_shape(x)[2:]
    out_spatial = static_shape(y)[2:]
    if not all(isinstance(s, int) for s in spatial + out_spatial):
        _unsupported(node, f"needs static spatial sizes, got {spatial} -> {out_spatial}")
    n = len(spatial)
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    begin, _ = _explicit_pads(node, spatial, kernel, strides, dilations)
    end, output_padding = [], []
    for size, out, k, s, d, b in zip(spatial, out_spatial, kernel, strides, dilations, begin):
        extra = s * (out - 1) + d * (k - 1) + 1 - b - size
        end.append(max(extra, 0))
        output_padding.append(max(-extra, 0))
    return dict(strides=strides, dilations=dilations, pads=begin + end,
                output_padding=output_padding)


@rule("Conv")
def _conv(em, node, dy):
    """dx of a convolution. Stride 1 with constant weights: a Conv of dy with the flipped,
    group-transposed kernel (what ConvTranspose computes, but ONNX Runtime's CPU Conv kernels are
    1.2x (1x1) to 2.3x (5x5 depthwise) faster than its ConvTranspose at batch 25). Otherwise
    (strides > 1, where zero-stuffing dy would cost more than it saves; weights computed at run
    time): ConvTranspose."""
    x, w = node.inputs[:2]
    if em.wants(w):
        _unsupported(node, "the gradient with respect to the weights is not supported")
    dx = _conv_as_correlation(em, node, dy[0])
    if dx is None:
        return _conv_by_conv_transpose(em, node, dy)
    return [dx] + [None] * (len(node.inputs) - 1)


def _conv_by_conv_transpose(em, node, dy):
    """dx of a convolution as one ConvTranspose with the forward weights (any strides)."""
    x, w = node.inputs[:2]
    kernel = list(node.attrs.get("kernel_shape", static_shape(w)[2:]))
    geometry = _transpose_geometry(node, x, _y(node), kernel)
    dx = em.op("ConvTranspose", dy[0], w, group=node.attrs.get("group", 1),
               kernel_shape=kernel, **geometry)
    return [dx] + [None] * (len(node.inputs) - 1)


def _conv_as_correlation(em, node, dy):
    """dx of a stride-1 convolution as a Conv, or None where that form does not apply.

    With y[m, i] = sum_{c, t} x[c, i - b + d t] w[m, c, t] (b the begin pad, d the dilation),
    dx[c, i] = sum_{m, t} dy[m, i + b - d t] w[m, c, t]: a correlation of dy with the kernel
    flipped along its spatial axes and transposed within each group ([M, C/g, k] ->
    [C, M/g, k]), begin pad d (k - 1) - b and end pad (in - out) + b, which gives dx exactly the
    input's size. Needs constant weights (transposed once, at rewrite time) and pads >= 0."""
    x, w = node.inputs[:2]
    weights = constant_value(w)
    in_file = weights is None and stays_on_disk(w)
    shape = list(w.shape) if in_file else (list(weights.shape) if weights is not None else None)
    spatial, out_spatial = static_shape(x)[2:], static_shape(_y(node))[2:]
    n = len(spatial)
    if shape is None or len(shape) != n + 2:
        return None
    if not all(isinstance(s, int) for s in spatial + out_spatial):
        return None
    if any(int(s) != 1 for s in node.attrs.get("strides", [1] * n)):
        return None
    kernel = shape[2:]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * n)]
    begin, _ = _explicit_pads(node, spatial, kernel, [1] * n, dilations)
    new_begin = [d * (k - 1) - b for d, k, b in zip(dilations, kernel, begin)]
    new_end = [size - out + b for size, out, b in zip(spatial, out_spatial, begin)]
    if min(new_begin + new_end) < 0:
        return None
    group = int(node.attrs.get("group", 1))
    m, c_per_group = shape[:2]
    if in_file:
        flipped = _flipped_in_graph(em, w, group, m, c_per_group, kernel)
    else:
        flipped = weights.reshape(group, m // group, c_per_group, *kernel)
        flipped = np.swapaxes(flipped, 1, 2).reshape(group * c_per_group, m // group, *kernel)
        flipped = np.ascontiguousarray(flipped[(slice(None), slice(None)) + (slice(None, None, -1),) * n])
        flipped = em.const(flipped, dtype=weights.dtype)
    return em.op("Conv", dy, flipped, group=group,
                 kernel_shape=kernel, dilations=dilations, pads=new_begin + new_end)


def _flipped_in_graph(em, w, group, m, c_per_group, kernel):
    """The correlation's kernel as nodes on a weight left in its file: ONNX Runtime folds them
    into one constant when the session is made."""
    n = len(kernel)
    grouped = em.op("Reshape", w, em.ints([group, m // group, c_per_group, *kernel]))
    swapped = em.op("Transpose", grouped, perm=[0, 2, 1, *range(3, 3 + n)])
    merged = em.op("Reshape", swapped, em.ints([group * c_per_group, m // group, *kernel]))
    axes = list(range(2, 2 + n))
    return em.op("Slice", merged, em.ints([-1] * n), em.ints([np.iinfo(np.int64).min] * n),
                 em.ints(axes), em.ints([-1] * n))


@rule("ConvTranspose")
def _conv_transpose(em, node, dy):
    """dx of a transposed convolution is the convolution it transposes: a Conv of dy with the
    same weights ([C, M/g, k] is a Conv's layout), strides, dilations, groups and begin pads;
    the end pads make dx the input's size (output_padding only added rows that read nothing).
    Needs explicit pads (or VALID): pads derived from output_shape or SAME are placed
    differently by different runtimes."""
    x, w = node.inputs[:2]
    if em.wants(w):
        _unsupported(node, "the gradient with respect to the weights is not supported")
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if "output_shape" in node.attrs or auto_pad not in ("NOTSET", "", "VALID"):
        _unsupported(node, "needs explicit pads (output_shape and SAME padding are not supported); "
                           "re-export it with explicit pads")
    spatial, out_spatial = static_shape(x)[2:], static_shape(_y(node))[2:]
    if not all(isinstance(s, int) for s in spatial + out_spatial):
        _unsupported(node, f"needs static spatial sizes, got {spatial} -> {out_spatial}")
    n = len(spatial)
    kernel = list(node.attrs.get("kernel_shape", static_shape(w)[2:]))
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    begin, _ = _explicit_pads(node, spatial, kernel, strides, dilations)
    end = [max(s * (size - 1) + d * (k - 1) + 1 - out - b, 0)
           for size, out, k, s, d, b in zip(spatial, out_spatial, kernel, strides, dilations, begin)]
    dx = em.op("Conv", dy[0], w, group=node.attrs.get("group", 1), kernel_shape=kernel, strides=strides,
               dilations=dilations, pads=begin + end)
    return [dx] + [None] * (len(node.inputs) - 1)


@rule("MaxPool")
def _max_pool(em, node, dy):
    x = _x(node)
    if len(node.outputs) > 1 and node.outputs[1].name:
        indices = node.outputs[1]
    else:
        _, indices = em.op("MaxPool", x, outputs=2, **node.attrs)
    zeros = em.zeros(em.op("Reshape", em.op("Size", x), em.ints([1])))
    flat = em.op("ScatterElements", zeros, em.op("Reshape", indices, em.ints([-1])),
                 em.op("Reshape", dy[0], em.ints([-1])), axis=0, reduction="add")
    return [em.reshape_like(flat, x)]


def _window_counts(size, out, k, s, d, begin):
    """How many real (non-padding) input positions each pooling window covers, per axis."""
    starts = np.arange(out) * s - begin
    taps = starts[:, None] + np.arange(k)[None, :] * d
    return ((taps >= 0) & (taps < size)).sum(axis=1)


@rule("AveragePool")
def _average_pool(em, node, dy):
    x, y = _x(node), _y(node)
    kernel = list(node.attrs["kernel_shape"])
    geometry = _transpose_geometry(node, x, y, kernel)
    spatial, out_spatial = static_shape(x)[2:], static_shape(y)[2:]
    channels = static_shape(x)[1]
    n = len(spatial)
    # 1/divisor per window = AveragePool(ones) / (number of real inputs in the window): the runtime
    # itself says what it divides by (count_include_pad, ceil_mode edges), the counts are exact.
    counts = np.ones(out_spatial, dtype=np.float64)
    for axis in range(n):
        c = _window_counts(spatial[axis], out_spatial[axis], kernel[axis],
                           geometry["strides"][axis], geometry["dilations"][axis],
                           geometry["pads"][axis])
        counts = counts * c.reshape([-1 if i == axis else 1 for i in range(n)])
    inv_counts = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    ones = em.const(np.ones([1, 1] + spatial))
    averaged_ones = em.op("AveragePool", ones, **node.attrs)
    weight = em.op("Mul", averaged_ones, em.const(inv_counts[None, None]))
    kernel_ones = em.const(np.ones([channels, 1] + kernel))
    dx = em.op("ConvTranspose", em.op("Mul", dy[0], weight), kernel_ones, group=channels,
               kernel_shape=kernel, **geometry)
    return [dx]


@rule("GlobalAveragePool")
def _global_average_pool(em, node, dy):
    x = _x(node)
    spatial = static_shape(x)[2:]
    if all(isinstance(s, int) for s in spatial):  # scale the (N, C, 1, 1) dy
        scaled = em.scaled(dy[0], 1.0 / float(np.prod(spatial)))
    else:
        scaled = em.op("Mul", dy[0], _size_ratio(em, _y(node), x))
    return [em.op("Expand", scaled, em.shape(x))]


def _size_ratio(em, small, large):
    """Size(small) / Size(large) as a float scalar, for reductions over symbolic axes."""
    return em.op("Div", em.to_float(em.op("Size", small)), em.to_float(em.op("Size", large)))


def _reduce_axes(node: gs.Node, rank: int) -> list[int] | None:
    """Reduced axes of a Reduce* node (attribute before opset 18, input after); None = no-op."""
    axes = node.attrs.get("axes")
    if axes is None and _present(node, 1):
        value = constant_value(node.inputs[1])
        if value is None:
            _unsupported(node, "reduction axes must be constant")
        axes = value.tolist()
    if not axes:
        return None if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(_axis(int(a), rank) for a in axes)


def _keepdims_gradient(em, node, dy, axes):
    """dy reshaped so it broadcasts against the reduction's input."""
    if node.attrs.get("keepdims", 1):
        return dy
    return em.op("Unsqueeze", dy, em.ints(axes))


def _kept_reduction(em, node, dy):
    """(y, dy) of a reduction, shaped to broadcast against its input (as they are where it
    reduces nothing)."""
    axes = _reduce_axes(node, len(static_shape(_x(node))))
    if axes is None:
        return _y(node), dy[0]
    return _keepdims_gradient(em, node, _y(node), axes), _keepdims_gradient(em, node, dy[0], axes)


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(em, node, dy):
    x = _x(node)
    axes = _reduce_axes(node, len(static_shape(x)))
    if axes is None:
        return [dy[0]] + [None] * (len(node.inputs) - 1)
    kept = _keepdims_gradient(em, node, dy[0], axes)
    if node.op == "ReduceMean":  # scale the reduced dy, before it is expanded
        kept = em.op("Mul", kept, _size_ratio(em, _y(node), x))
    return [em.op("Expand", kept, em.shape(x))] + [None] * (len(node.inputs) - 1)


@rule("ReduceL2", "ReduceSumSquare")
def _reduce_l2(em, node, dy):
    """``sqrt(sum x^2)``: ``dy * x / y`` (0 where the norm is 0, as torch's ``norm`` gives; the
    Max keeps 0 / 0 out); ``sum x^2``: ``2 * dy * x``. F.normalize exports as ReduceL2."""
    x = _x(node)
    y_kept, dy_kept = _kept_reduction(em, node, dy)  # no reduction: |x| and x^2
    if node.op == "ReduceSumSquare":
        return [em.op("Mul", em.op("Mul", dy_kept, em.const(2.0)), x)] + [None] * (len(node.inputs) - 1)
    norm = em.op("Max", y_kept, em.const(np.finfo(em.dtype).tiny))
    return [em.op("Mul", em.op("Div", dy_kept, norm), x)] + [None] * (len(node.inputs) - 1)


@rule("ReduceL1", "ReduceLogSumExp")
def _reduce_l1_logsumexp(em, node, dy):
    """``sum |x|``: ``dy * sign(x)``; ``log sum exp x``: ``dy * exp(x - y)`` (the softmax)."""
    x = _x(node)
    y_kept, dy_kept = _kept_reduction(em, node, dy)
    local = em.op("Sign", x) if node.op == "ReduceL1" else em.op("Exp", em.op("Sub", x, y_kept))
    return [em.op("Mul", dy_kept, local)] + [None] * (len(node.inputs) - 1)


@rule("CumSum")
def _cumsum(em, node, dy):
    """Each input reaches the sums after it (before it, reversed): the gradient is the cumulative
    sum of dy the other way, exclusive where the forward is."""
    reverse = int(node.attrs.get("reverse", 0))
    return [em.op("CumSum", dy[0], node.inputs[1], exclusive=int(node.attrs.get("exclusive", 0)),
                  reverse=1 - reverse), None]


def _max_gradient(em, x, y_kept, dy_kept, axes):
    """Route dy to the maxima (or minima), shared evenly among ties (as torch.amax does)."""
    hits = em.to_float(em.op("Equal", x, y_kept))
    ties = em.reduce_sum(hits, axes, keepdims=True)
    return em.op("Mul", hits, em.op("Div", dy_kept, ties))


@rule("ReduceMax", "ReduceMin")
def _reduce_max(em, node, dy):
    x = _x(node)
    axes = _reduce_axes(node, len(static_shape(x)))
    if axes is None:
        return [dy[0]] + [None] * (len(node.inputs) - 1)
    y_kept = _keepdims_gradient(em, node, _y(node), axes)
    dy_kept = _keepdims_gradient(em, node, dy[0], axes)
    return [_max_gradient(em, x, y_kept, dy_kept, axes)] + [None] * (len(node.inputs) - 1)


@rule("GlobalMaxPool")
def _global_max_pool(em, node, dy):
    x = _x(node)
    axes = list(range(2, len(static_shape(x))))
    return [_max_gradient(em, x, _y(node), dy[0], axes)]


# ---------------------------------------------------------------------------------------------
# Quantization (QDQ models): the straight-through estimator of quantization-aware training
# ---------------------------------------------------------------------------------------------

def _along_quantization_axis(em, node, t, rank):
    """A scale or zero point as a float tensor that broadcasts against the data: per tensor as it
    is, per axis reshaped to lie along ``axis``; blocked quantization is not supported."""
    if node.attrs.get("block_size", 0):
        _unsupported(node, "blocked quantization (block_size) is not supported")
    t = em.to_float(t)
    shape = static_shape(node.inputs[1])
    if len(shape) == 0 or shape == [1]:
        return t
    axis = _axis(node.attrs.get("axis", 1), rank)
    return em.op("Reshape", t, em.ints([-1 if i == axis else 1 for i in range(rank)]))


@rule("DequantizeLinear")
def _dequantize_linear(em, node, dy):
    """``x = (q - zero_point) * scale``: the integer tensor ``q`` stands for its values, so it
    gets the gradient ``dy * scale`` (in float)."""
    rank = len(static_shape(_x(node)))
    return [em.op("Mul", dy[0], _along_quantization_axis(em, node, node.inputs[1], rank))] + \
        [None] * (len(node.inputs) - 1)


@rule("QuantizeLinear")
def _quantize_linear(em, node, dy):
    """``q = saturate(round(x / scale) + zero_point)`` is flat almost everywhere, so its true
    gradient is 0; as in quantization-aware training, the gradient goes straight through,
    ``dy / scale``, wherever ``round(x / scale) + zero_point`` lies within the integer type's
    range, and is 0 where it saturates. With the DequantizeLinear after it, the pair passes
    ``dy`` where the value is in range."""
    x, y = _x(node), _y(node)
    rank = len(static_shape(x))
    dtype = y.dtype if y.dtype is not None else (node.inputs[2].dtype if _present(node, 2) else np.uint8)
    info = np.iinfo(np.dtype(dtype))
    scale = _along_quantization_axis(em, node, node.inputs[1], rank)
    level = em.op("Round", em.op("Div", x, scale))
    if _present(node, 2):
        zero = _along_quantization_axis(em, node, node.inputs[2], rank)
        level = em.op("Add", level, zero)
    inside = em.op("And", em.op("GreaterOrEqual", level, em.const(float(info.min))),
                   em.op("LessOrEqual", level, em.const(float(info.max))))
    return [em.mask(inside, em.op("Div", dy[0], scale))] + [None] * (len(node.inputs) - 1)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

def _channel_view(em, t, rank):
    """Reshape a per-channel vector [C] to [C, 1, ..., 1] so it broadcasts over N C H W."""
    return em.op("Reshape", t, em.ints([-1] + [1] * (rank - 2)))


@rule("BatchNormalization")
def _batch_norm(em, node, dy):
    if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o.name]) > 1:
        _unsupported(node, "only inference-mode batch normalization is supported")
    x, scale, _, _, var = node.inputs
    rank = len(static_shape(x))
    eps = node.attrs.get("epsilon", 1e-5)
    factor = em.op("Div", scale, em.op("Sqrt", em.op("Add", var, em.const(eps))))
    return [em.op("Mul", dy[0], _channel_view(em, factor, rank)), None, None, None, None]


def _normalize_backward(em, x, dxhat, axes, eps):
    """d/dx of xhat = (x - mean) / sqrt(var + eps) over ``axes``, given d/dxhat."""
    dims = [static_shape(x)[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        inv_count = em.const(1.0 / float(np.prod(dims)))
    else:
        inv_count = _size_ratio(em, em.reduce_sum(x, axes), x)

    def mean(t):
        return em.op("Mul", em.reduce_sum(t, axes), inv_count)

    centered = em.op("Sub", x, mean(x))
    inv_std = em.op("Reciprocal", em.op("Sqrt", em.op("Add", mean(em.op("Mul", centered, centered)),
                                                        em.const(eps))))
    xhat = em.op("Mul", centered, inv_std)
    term = em.op("Sub", dxhat, mean(dxhat))
    term = em.op("Sub", term, em.op("Mul", xhat, mean(em.op("Mul", dxhat, xhat))))
    return em.op("Mul", term, inv_std)


@rule("InstanceNormalization")
def _instance_norm(em, node, dy):
    x, scale = node.inputs[:2]
    rank = len(static_shape(x))
    dxhat = em.op("Mul", dy[0], _channel_view(em, scale, rank))
    axes = list(range(2, rank))
    return [_normalize_backward(em, x, dxhat, axes, node.attrs.get("epsilon", 1e-5)), None, None]


@rule("LayerNormalization")
def _layer_norm(em, node, dy):
    if len([o for o in node.outputs if o.name]) > 1 and any(g is not None for g in dy[1:]):
        _unsupported(node, "gradients through the Mean/InvStdDev outputs are not supported")
    x, scale = node.inputs[:2]
    rank = len(static_shape(x))
    axes = list(range(_axis(node.attrs.get("axis", -1), rank), rank))
    dxhat = em.op("Mul", dy[0], scale)
    dx = _normalize_backward(em, x, dxhat, axes, node.attrs.get("epsilon", 1e-5))
    return [dx] + [None] * (len(node.inputs) - 1)


@rule("LRN")
def _lrn(em, node, dy):
    # y = x * d^-beta with d = bias + alpha/size * (window sum of x^2 over channels).
    x = _x(node)
    size = int(node.attrs["size"])
    alpha, beta = node.attrs.get("alpha", 1e-4), node.attrs.get("beta", 0.75)
    bias = node.attrs.get("bias", 1.0)
    channels = static_shape(x)[1]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def channel_window_sum(t, pad_before, pad_after):
        as_image = em.op("Reshape", t, em.ints([0, 1, channels, -1]))
        kernel = em.const(np.ones([1, 1, size, 1]))
        summed = em.op("Conv", as_image, kernel, pads=[pad_before, 0, pad_after, 0])
        return em.reshape_like(summed, x)

    d = em.op("Add", em.const(bias),
              em.op("Mul", em.const(alpha / size), channel_window_sum(em.op("Mul", x, x), before, after)))
    d_pow = em.op("Pow", d, em.const(-beta))
    direct = em.op("Mul", dy[0], d_pow)
    t = em.op("Mul", em.op("Mul", dy[0], x), em.op("Div", d_pow, d))
    spread = channel_window_sum(t, after, before)  # the transposed window
    cross = em.op("Mul", em.const(2 * alpha * beta / size), em.op("Mul", x, spread))
    return [em.op("Sub", direct, cross)]


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------

@rule("Resize")
def _resize(em, node, dy):
    m_h, m_w = resize_matrices(node)
    # dx = M_h^T @ dy @ M_w over the two spatial axes.
    dx = em.op("MatMul", em.op("MatMul", em.const(m_h.T), dy[0]), em.const(m_w))
    return [dx] + [None] * (len(node.inputs) - 1)
