"""Models exported from PyTorch with the op patterns of modern classifiers: onnxcam's gradient at
the target layer must match torch.autograd. Skipped where torch is not installed
(``pip install torch==2.13.0`` takes a CPU build)."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest

from onnxcam.graph.rewrite import ACTIVATION, GRADIENT, LOGITS, SEED, build_gradient_model
from tests.gradcheck import together_and_alone

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.torch


class Classifier(nn.Module):
    """``body`` produces the target activation, ``head`` maps it to logits."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class SqueezeExcite(nn.Module):
    def __init__(self, c, gate=nn.Sigmoid):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(),
                                nn.Conv2d(c // 4, c, 1), gate())

    def forward(self, x):
        return x * self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNetV3: expand, depthwise, hard-sigmoid SE, project, residual."""

    def __init__(self, c, expand=3):
        super().__init__()
        e = c * expand
        self.block = nn.Sequential(conv_bn(c, e, 1, act=nn.Hardswish), conv_bn(e, e, 3, groups=e, act=nn.Hardswish),
                                   SqueezeExcite(e, gate=nn.Hardsigmoid), nn.Conv2d(e, c, 1, bias=False),
                                   nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, MLP with GELU, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y


class DenseBlock(nn.Module):
    def __init__(self, c, growth=6, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(conv_bn(c + i * growth, growth) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class ChannelsLastNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SizeView(nn.Module):
    """``x.view(x.size(0), -1)``: with a dynamic batch the export computes the target shape from
    ``Shape(x)`` on the path from the layer to the logits."""

    def forward(self, x):
        return x.view(x.size(0), -1)


def gap_linear(c, classes=10):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def squeeze_excitation():
    return Classifier(conv_bn(3, 16, stride=2), nn.Sequential(SqueezeExcite(16), conv_bn(16, 24), gap_linear(24)))


def inverted_residual_hardswish():
    return Classifier(conv_bn(3, 8, stride=2, act=nn.Hardswish),
                      nn.Sequential(InvertedResidual(8), InvertedResidual(8), gap_linear(8)))


def layernorm_gelu():
    return Classifier(nn.Conv2d(3, 16, 4, stride=4),
                      nn.Sequential(ChannelsLastNorm(16), ConvNeXtBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.LayerNorm(16), nn.Linear(16, 10)))


def conv1x1_classifier():
    return Classifier(nn.Sequential(conv_bn(3, 16, stride=2), nn.MaxPool2d(3, 2, ceil_mode=True)),
                      nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Softmax(dim=1)))


def densenet_concat():
    return Classifier(nn.Sequential(conv_bn(3, 12, stride=2), nn.MaxPool2d(2)),
                      nn.Sequential(DenseBlock(12), nn.BatchNorm2d(24), nn.ReLU(),
                                    nn.AvgPool2d(2), DenseBlock(24), gap_linear(36)))


class EncoderHead(nn.Module):
    """Patches as tokens through torch's TransformerEncoderLayer (nn.MultiheadAttention), whose
    export computes reshape targets through Mod and Add of constants."""

    def __init__(self, width=24, classes=10):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.encoder(x.flatten(2).transpose(1, 2)).mean(1))


def multihead_attention():
    return Classifier(nn.Conv2d(3, 24, 8, stride=8), nn.Sequential(EncoderHead()))


def size_view_flatten():
    return Classifier(conv_bn(3, 8, stride=2),
                      nn.Sequential(conv_bn(8, 8), nn.AdaptiveAvgPool2d(2), SizeView(), nn.Linear(32, 10)))


class Maximum(nn.Module):
    """``torch.maximum`` of two tensors on the path (an ONNX Max), then a clamp into [0, 6] by
    ``torch.minimum``/``torch.maximum`` with constants, as TensorFlow-style ReLU6 exports."""

    def forward(self, x):
        return torch.minimum(torch.maximum(torch.maximum(x, 0.2 * x), torch.zeros(())), torch.full((), 6.0))


def decoder_upsampling():
    """A decoder's upsampling: ConvTranspose2d (grouped, stride 2, output_padding), Mish (exported
    as Softplus, Tanh, Mul), PixelShuffle (DepthToSpace, CRD), PixelUnshuffle (Reshape and
    Transpose), Max and Min."""
    return Classifier(conv_bn(3, 16, stride=2),
                      nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=2),
                                    nn.Mish(), nn.PixelShuffle(2), nn.PixelUnshuffle(4), Maximum(),
                                    gap_linear(32)))


PATTERNS = {
    "squeeze-excitation": (squeeze_excitation, 17),
    "inverted-residual-hardswish": (inverted_residual_hardswish, 17),
    "layernorm-gelu-opset17": (layernorm_gelu, 17),
    "layernorm-gelu-opset20": (layernorm_gelu, 20),
    "conv1x1-classifier": (conv1x1_classifier, 17),
    "densenet-concat": (densenet_concat, 17),
    "size-view-flatten": (size_view_flatten, 17),
    "multihead-attention": (multihead_attention, 17),
    "decoder-upsampling": (decoder_upsampling, 17),
}


def _randomise_batchnorm(model, generator):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)


def export(model, opset) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), buffer, input_names=["input"], output_names=["output"],
                      opset_version=opset, dynamo=False, dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return buffer.getvalue()


def _layer_tensor(gm, onnx_bytes, x, activation) -> str:
    """The ONNX tensor holding the torch body's output: the candidate whose values equal it."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_bytes)
    for candidate in reversed(gm.candidates):
        if tuple(candidate.shape[1:]) != tuple(activation.shape[1:]):
            continue
        probe = onnx.ModelProto.FromString(gm.model.SerializeToString())
        probe.graph.output.append(helper.make_tensor_value_info(candidate.tensor, onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        seed = np.zeros([x.shape[0], gm.num_classes], np.float32)
        value = session.run([candidate.tensor], {gm.input_name: x, SEED: seed})[0]
        if np.allclose(value, activation, rtol=1e-4, atol=1e-5):
            return candidate.tensor
    raise AssertionError(f"no ONNX tensor matches the torch body's output among {len(gm.candidates)} candidates "
                         f"({len(model.graph.node)} nodes)")


@pytest.mark.parametrize("name", list(PATTERNS))
def test_gradient_matches_torch_autograd(name):
    build, opset = PATTERNS[name]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build().eval()
    _randomise_batchnorm(model, generator)
    onnx_bytes = export(model, opset)

    x = torch.randn(2, 3, 32, 32, generator=generator)
    activation = model.body(x).detach().requires_grad_(True)
    head = model.head
    if isinstance(head[-1], nn.Softmax):  # the score is the pre-softmax logit
        head = head[:-1]
    logits = head(activation)
    seed = torch.randn(logits.shape, generator=generator)
    (grad_torch,) = torch.autograd.grad((logits * seed).sum(), activation)

    import onnx

    gm0 = build_gradient_model(onnx.load_from_string(onnx_bytes))
    layer = _layer_tensor(gm0, onnx_bytes, x.numpy(), activation.detach().numpy())
    gm = build_gradient_model(onnx.load_from_string(onnx_bytes), layer=layer)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    a_onnx, g_onnx = session.run([ACTIVATION, GRADIENT], {gm.input_name: x.numpy(), SEED: seed.numpy()})

    np.testing.assert_allclose(a_onnx, activation.detach().numpy(), rtol=1e-4, atol=1e-5)
    error = np.abs(g_onnx - grad_torch.numpy()).max() / np.abs(grad_torch.numpy()).max()
    assert error < 1e-4, f"{name}: relative gradient error {error:.2e} at layer {layer}"


class Attention(nn.Module):
    """timm's ViT attention: one qkv projection, heads split by reshapes of the batch's size."""

    def __init__(self, width, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = (q @ k.transpose(-2, -1) * (width // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), Attention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT on 16x16 images: 4x4 patches (a 4 x 4 grid), a class token, two timm-style blocks."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.patches = nn.Conv2d(3, width, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, width) * 0.5)
        self.position = nn.Parameter(torch.randn(1, 17, width) * 0.5)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def tokens(self, x):
        """The tokens that enter the last block."""
        patches = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1) + self.position
        return self.blocks[0](x)

    def rest(self, tokens):
        return self.head(self.norm(self.blocks[1](tokens))[:, 0])

    def forward(self, x):
        return self.rest(self.tokens(x))


def test_a_vit_is_explained_at_its_last_blocks_input_on_the_patch_grid(tmp_path):
    """ViT tokens (N, 1 + 16, C) are candidates: the automatic layer is the last block's input
    (after it only the class token reaches the head, so every patch's gradient is 0 there), and A
    and g come back as the 4 x 4 patch grid, matching torch.autograd on the same tokens."""
    import onnx

    torch.manual_seed(0)
    model = TinyViT().eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), buffer, input_names=["input"], output_names=["output"],
                      opset_version=17, dynamo=False)
    gm = build_gradient_model(onnx.load_from_string(buffer.getvalue()))
    assert gm.batch_built_in is None
    assert gm.layer_layout == "NLC" and tuple(gm.activation_shape[1:]) == (16, 4, 4)

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = model.tokens(x).detach().requires_grad_(True)
    logits = model.rest(tokens)
    seed = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (grad_torch,) = torch.autograd.grad((logits * seed).sum(), tokens)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    a_onnx, g_onnx = session.run([ACTIVATION, GRADIENT], {gm.input_name: x.numpy(), SEED: seed.numpy()})

    def on_grid(t):
        return t[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2).detach().numpy()

    np.testing.assert_allclose(a_onnx, on_grid(tokens), rtol=1e-4, atol=1e-5)
    error = np.abs(g_onnx - on_grid(grad_torch)).max() / np.abs(grad_torch.numpy()).max()
    assert error < 1e-4, f"relative gradient error {error:.2e} at layer {gm.layer}"

    from tests.cli_helpers import run

    (tmp_path / "vit.onnx").write_bytes(buffer.getvalue())
    inspected = run(["inspect", tmp_path / "vit.onnx"])
    assert f"*  {gm.layer}" in inspected.stdout and "NLC" in inspected.stdout
    assert "only the class token reaches the score" in inspected.stdout


def test_multihead_attention_exported_for_one_image_runs_in_batches():
    """The classic exporter without dynamic axes writes MultiheadAttention's batch of 1 into its
    reshapes, one of them computed from Shape with the batch in dim 1: batch_axis follows it, the
    run of two images confirms it, and a run of 3 gives each image's single-run gradient."""
    import onnx

    torch.manual_seed(0)
    model = multihead_attention().eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), buffer, input_names=["input"], output_names=["output"],
                      opset_version=17, dynamo=False)
    gm = build_gradient_model(onnx.load_from_string(buffer.getvalue()), layer="/body/Conv_output_0")
    assert gm.batch_built_in is None
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    seed = np.random.default_rng(4).standard_normal((3, 10)).astype(np.float32)
    (together, logits), (alone, _) = together_and_alone(gm, x, seed, (GRADIENT, LOGITS))
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_tokens_whose_count_shape_inference_loses_are_still_read_on_their_grid():
    """With a dynamic batch, the classic export of MultiheadAttention leaves the token count
    symbolic; the per-image shapes give it back, so the tokens are candidates on their 4 x 4 grid
    (the flattened map (N, 24, 16) is not read as tokens). At the first, the attention's residual
    sum, A and g match torch on the same grid."""
    import onnx

    torch.manual_seed(0)
    model = multihead_attention().eval()
    onnx_model = onnx.load_from_string(export(model, 17))
    tokens = [c for c in build_gradient_model(onnx_model).candidates if c.layout == "NLC"]
    assert tokens and all(c.shape[1:] == (16, 24) for c in tokens)
    gm = build_gradient_model(onnx_model, layer=tokens[0].tensor)
    assert tuple(gm.activation_shape[1:]) == (24, 4, 4)

    encoder, fc = model.head[0].encoder, model.head[0].fc
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    patches = model.body(x).flatten(2).transpose(1, 2)
    residual = (patches + encoder._sa_block(patches, None, None)).detach().requires_grad_(True)
    after = encoder.norm1(residual)
    logits = fc(encoder.norm2(after + encoder._ff_block(after)).mean(1))
    seed = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6))
    (expected,) = torch.autograd.grad((logits * seed).sum(), residual)
    session = ort.InferenceSession(gm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    a_onnx, g_onnx = session.run([ACTIVATION, GRADIENT], {gm.input_name: x.numpy(), SEED: seed.numpy()})

    def on_grid(t):
        return t.reshape(2, 4, 4, 24).permute(0, 3, 1, 2).detach().numpy()

    np.testing.assert_allclose(a_onnx, on_grid(residual), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_onnx, on_grid(expected), rtol=1e-4, atol=1e-4 * np.abs(expected.numpy()).max())


class RegisterViT(nn.Module):
    """Hugging Face's Dinov2WithRegisters in small: 4x4 patches (an 8 x 8 grid of a 32x32 image), position
    embeddings interpolated to a grid read from the input's shape (a Resize whose sizes come from
    ``Shape`` through ``Div``, beyond ONNX's shape inference), a class token expanded to the batch,
    4 register tokens put in by ``cat(x[:, :1], registers, x[:, 1:])``, and a head on the class
    token and the mean of the patch tokens."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.patches = nn.Conv2d(3, width, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, width) * 0.5)
        self.registers = nn.Parameter(torch.randn(1, 4, width) * 0.5)
        self.position = nn.Parameter(torch.randn(1, width, 2, 2) * 0.5)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(2 * width, classes)

    def tokens(self, x):
        """The tokens that enter the last block."""
        rows, columns = x.shape[2] // 4, x.shape[3] // 4
        position = nn.functional.interpolate(self.position, size=(rows, columns), mode="bilinear")
        patches = (self.patches(x) + position).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self.blocks[0](x)

    def rest(self, tokens, grid):
        """The head reads the patch tokens in a shape computed from the input's (a ``Shape`` of
        the input after every block)."""
        out = self.norm(self.blocks[1](tokens))
        patches = out[:, 5:].reshape(out.shape[0], grid[0] * grid[1], -1)
        return self.head(torch.cat([out[:, 0], patches.mean(1)], dim=1))

    def forward(self, x):
        return self.rest(self.tokens(x), (x.shape[2] // 4, x.shape[3] // 4))


def test_a_vit_with_register_tokens_and_shapes_read_from_its_input():
    """The patterns of Hugging Face's ViT exports: sizes computed from the input's Shape (measured
    at a batch of 1 where inference loses them; a Shape is no way around a layer), and a class
    token plus 4 registers ahead of the patches (read as tokens, and taking the class token off to
    put it back is no class-token selection). Every patch reaches the head through the mean, so
    the automatic layer is the last token layer, on the 8 x 8 grid; its gradient matches torch
    and a run of 3 matches single runs."""
    import onnx

    torch.manual_seed(0)
    model = RegisterViT().eval()
    onnx_model = onnx.load_from_string(export(model, 17))
    gm = build_gradient_model(onnx_model)
    assert gm.batch_built_in is None
    assert gm.layer_layout == "NLC" and tuple(gm.activation_shape[1:]) == (16, 8, 8)
    assert gm.candidates[-1].tensor == gm.layer and gm.candidates[-1].shape[1:] == (69, 16)

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = model.tokens(x).detach().requires_grad_(True)
    gm = build_gradient_model(onnx_model, layer=_layer_tensor(gm, export(model, 17), x.numpy(), tokens.detach().numpy()))
    logits = model.rest(tokens, (8, 8))
    seed = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (grad_torch,) = torch.autograd.grad((logits * seed).sum(), tokens)
    (a_onnx, g_onnx), (_, g_alone) = together_and_alone(gm, x.numpy(), seed.numpy(), (ACTIVATION, GRADIENT))

    def on_grid(t):
        return t[:, 5:].reshape(3, 8, 8, 16).permute(0, 3, 1, 2).detach().numpy()

    np.testing.assert_allclose(a_onnx, on_grid(tokens), rtol=1e-4, atol=1e-5)
    error = np.abs(g_onnx - on_grid(grad_torch)).max() / np.abs(grad_torch.numpy()).max()
    assert error < 1e-4, f"relative gradient error {error:.2e} at layer {gm.layer}"
    np.testing.assert_allclose(g_onnx, g_alone, rtol=1e-5, atol=1e-6 * np.abs(g_alone).max())
