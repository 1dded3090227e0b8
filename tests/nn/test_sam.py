"""Tests of the self-attention module against docs/METHOD.md equations (4)-(7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uda_sam.nn import SelfAttentionModule, attention_map, relu_cosine_attention, relu_cosine_similarity


def reference_sam(
    logits: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """Equations (4)-(7) written out in float64 with explicit norms and row sums."""
    logits = logits.double()
    query = (
        logits
        if weight is None
        else F.conv2d(logits, weight.double(), bias.double(), padding=weight.shape[-1] // 2)
    )
    batch, channels, height, width = logits.shape
    q = query.reshape(batch, query.shape[1], -1).transpose(1, 2)  # (B, N, C')
    p = logits.reshape(batch, channels, -1).transpose(1, 2)  # (B, N, C)
    norms = torch.sqrt((q * q).sum(-1))  # |Q_i|
    a = torch.einsum("bic,bjc->bij", q, q) / (norms[:, :, None] * norms[:, None, :])  # (4)
    r = torch.where(a > 0, a, torch.zeros_like(a))
    a_hat = r / r.sum(-1, keepdim=True)  # (5)
    p_sa = torch.einsum("bij,bjc->bic", a_hat, p)  # (6), (7)
    return p_sa.transpose(1, 2).reshape(batch, channels, height, width)


@pytest.mark.parametrize("impl", ["full", "blockwise", "auto"])
@pytest.mark.parametrize(("embed", "kernel"), [(None, 1), (7, 3)])
def test_matches_reference(impl: str, embed: int | None, kernel: int) -> None:
    torch.manual_seed(0)
    sam = SelfAttentionModule(5, embed_channels=embed, kernel_size=kernel, impl=impl, block_size=7)
    logits = torch.randn(2, 5, 6, 7)
    expected = reference_sam(logits, sam.transform.weight, sam.transform.bias)
    out = sam(logits)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_no_conv_has_no_parameters_and_matches_reference() -> None:
    sam = SelfAttentionModule(4, use_conv=False)
    assert list(sam.parameters()) == [] and sam.state_dict() == {}
    logits = torch.randn(1, 4, 5, 3)
    torch.testing.assert_close(sam(logits).double(), reference_sam(logits, None, None), atol=1e-5, rtol=1e-5)


def test_state_dict_keys() -> None:
    assert set(SelfAttentionModule(19).state_dict()) == {"transform.weight", "transform.bias"}


def test_attention_rows_sum_to_one_and_match_reference() -> None:
    torch.manual_seed(1)
    sam = SelfAttentionModule(6, use_conv=False)
    logits = torch.randn(3, 6, 4, 5)
    att = sam.attention(logits)
    assert att.shape == (3, 20, 20)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 20))
    assert (att >= 0).all()
    p = logits.flatten(2).transpose(1, 2)
    torch.testing.assert_close(
        torch.bmm(att, p).transpose(1, 2).reshape_as(logits), sam(logits), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("block_size", [16, 13, 1000])  # divides N, does not divide N, larger than N
def test_blockwise_equals_full_values_and_gradients(block_size: int) -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 8, 8)  # N = 64
    logits[0, :, 1, 2] = 0.0  # a zero row of P
    full = SelfAttentionModule(5, embed_channels=4, impl="full")
    block = SelfAttentionModule(5, embed_channels=4, impl="blockwise", block_size=block_size)
    block.load_state_dict(full.state_dict())
    upstream = torch.randn_like(logits)
    results = []
    for sam in (full, block):
        x = logits.clone().requires_grad_(True)
        out = sam(x)
        grads = torch.autograd.grad((out * upstream).sum(), [x, *sam.parameters()])
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_blockwise_gradcheck_float64() -> None:
    torch.manual_seed(3)
    q = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, v: relu_cosine_attention(q, v, "blockwise", block_size=4), (q, v)
    )


def test_auto_picks_blockwise_for_large_maps() -> None:
    sam = SelfAttentionModule(3)
    assert sam.resolve_impl(1, 1024) == "full"
    assert sam.resolve_impl(1, 16384) == "blockwise"
    assert sam.resolve_impl(4, 8192) == "blockwise"


def test_zero_rows_give_zero_output_and_finite_gradients() -> None:
    logits = torch.randn(1, 3, 4, 4)
    logits[..., 0, :] = 0.0  # first image row of pixels is all zero
    for impl in ("full", "blockwise"):
        sam = SelfAttentionModule(3, use_conv=False, impl=impl, block_size=5)
        x = logits.clone().requires_grad_(True)
        out = sam(x)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert (out[..., 0, :] == 0).all()
        att = sam.attention(logits)
        assert torch.isfinite(att).all() and (att[0, :4] == 0).all()
    all_zero = torch.zeros(1, 3, 2, 2, requires_grad=True)
    out = SelfAttentionModule(3, impl="blockwise")(all_zero)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(all_zero.grad).all()


@pytest.mark.parametrize("impl", ["full", "blockwise"])
def test_bf16_autocast_runs_in_float32(impl: str) -> None:
    torch.manual_seed(4)
    sam = SelfAttentionModule(5, impl=impl, block_size=9)
    logits = torch.randn(1, 5, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sam(logits)
        out_bf16 = sam(logits.bfloat16())
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(out_bf16.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(logits.grad).all()
    # Only the 1x1 transform runs in bf16; the attention itself is float32.
    torch.testing.assert_close(out, sam(logits), atol=5e-2, rtol=5e-2)


def test_relu_cosine_similarity() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    sim = relu_cosine_similarity(a, b)
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2**-0.5, 0.0]])
    torch.testing.assert_close(sim, expected)
    q = torch.randn(2, 7, 3)
    sim = relu_cosine_similarity(q, q)
    torch.testing.assert_close(attention_map(q), sim / sim.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "embed_channels": 0}, "embed_channels"),
        ({"num_classes": 3, "kernel_size": 2}, "kernel_size"),
        ({"num_classes": 3, "impl": "fused"}, "impl"),
        ({"num_classes": 3, "block_size": 0}, "block_size"),
        ({"num_classes": 3, "eps": 0.0}, "eps"),
        ({"num_classes": 3, "use_conv": False, "embed_channels": 5}, "embed_channels"),
    ],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfAttentionModule(**kwargs)


def test_bad_input_raises() -> None:
    sam = SelfAttentionModule(4)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        sam(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="C=4"):
        sam(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="floating-point"):
        sam(torch.ones(1, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N"):
        relu_cosine_attention(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="share"):
        relu_cosine_attention(torch.randn(1, 3, 4), torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="row width"):
        relu_cosine_similarity(torch.randn(3, 4), torch.randn(3, 5))
