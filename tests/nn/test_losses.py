"""Tests of the segmentation and self-attention losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uda_sam.nn import SelfAttentionModule, segmentation_loss, self_attention_loss


def test_segmentation_loss_mean_over_labelled_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0] = 255
    loss = segmentation_loss(logits, labels)
    per_pixel = -F.log_softmax(logits, 1).gather(1, labels.clamp(max=3)[:, None])[:, 0]
    torch.testing.assert_close(loss, per_pixel[labels != 255].mean())


def test_segmentation_loss_upsamples_with_align_corners() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 13, 7), dtype=torch.uint8)
    up = F.interpolate(logits, size=(13, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(segmentation_loss(logits, labels), F.cross_entropy(up, labels.long()))
    up = F.interpolate(logits, size=(13, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        segmentation_loss(logits, labels, align_corners=False), F.cross_entropy(up, labels.long())
    )


def test_segmentation_loss_all_ignored_is_zero_with_gradient() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 8, 8), 255))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_segmentation_loss_bad_input() -> None:
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, H, W\)"):
        segmentation_loss(logits, torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        segmentation_loss(logits, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        segmentation_loss(logits, torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C, h, w\)"):
        segmentation_loss(torch.randn(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))


@pytest.fixture
def sam() -> SelfAttentionModule:
    torch.manual_seed(2)
    return SelfAttentionModule(4, impl="full")


@pytest.mark.parametrize("target", ["residual", "attended"])
@pytest.mark.parametrize("distance", ["l2", "kl", "cosine"])
def test_self_attention_loss_values(sam: SelfAttentionModule, target: str, distance: str) -> None:
    torch.manual_seed(3)
    p = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        p_sa = sam(p)
    goal = p + p_sa if target == "residual" else p_sa
    if distance == "l2":
        expected = ((p - goal) ** 2).mean()
    elif distance == "kl":
        q_prob, p_prob = goal.softmax(1), p.softmax(1)
        expected = (q_prob * (q_prob.log() - p_prob.log())).sum(1).mean()
    else:
        cos = (p * goal).sum(1) / (p.norm(dim=1) * goal.norm(dim=1))
        expected = (1 - cos).mean()
    loss = self_attention_loss(p, sam, target=target, distance=distance)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distance", ["l2", "kl", "cosine"])
def test_self_attention_loss_gradient_only_through_p(sam: SelfAttentionModule, distance: str) -> None:
    torch.manual_seed(4)
    p = torch.randn(1, 4, 4, 4, requires_grad=True)
    loss = self_attention_loss(p, sam, distance=distance)
    loss.backward()
    assert all(param.grad is None for param in sam.parameters())
    # The target is a constant: the gradient equals that of the distance to a fixed tensor.
    with torch.no_grad():
        goal = p + sam(p)
    q = p.detach().clone().requires_grad_(True)
    if distance == "l2":
        F.mse_loss(q, goal).backward()
    elif distance == "kl":
        F.kl_div(F.log_softmax(q, 1), F.log_softmax(goal, 1), reduction="none", log_target=True).sum(
            1
        ).mean().backward()
    else:
        (1 - F.cosine_similarity(q, goal, dim=1)).mean().backward()
    torch.testing.assert_close(p.grad, q.grad)


def test_self_attention_loss_zero_at_fixed_point() -> None:
    sam = SelfAttentionModule(3, use_conv=False)
    p = torch.ones(1, 3, 2, 2)  # every pixel identical: SAM(P) = P
    assert self_attention_loss(p, sam, target="attended").item() == pytest.approx(0.0, abs=1e-10)


def test_self_attention_loss_bad_input(sam: SelfAttentionModule) -> None:
    with pytest.raises(ValueError, match="num_classes=4"):
        self_attention_loss(torch.randn(1, 3, 2, 2), sam)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        self_attention_loss(torch.randn(4, 2, 2), sam)
    with pytest.raises(ValueError, match="target"):
        self_attention_loss(torch.randn(1, 4, 2, 2), sam, target="both")
    with pytest.raises(ValueError, match="distance"):
        self_attention_loss(torch.randn(1, 4, 2, 2), sam, distance="l1")
    with pytest.raises(ValueError, match="shape of its input"):
        self_attention_loss(torch.randn(1, 4, 2, 2), torch.nn.Flatten())


def test_feature_layer_variant() -> None:
    torch.manual_seed(5)
    features = torch.randn(1, 16, 3, 3, requires_grad=True)
    loss = self_attention_loss(features, SelfAttentionModule(16), target="attended")
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
