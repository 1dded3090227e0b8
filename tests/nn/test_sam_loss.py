"""SelfAttentionLoss: the one self-attention loss, bit-identical to the functional core it is built on."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule, save_sam, self_attention_loss


def trained_sam(channels: int, seed: int) -> SelfAttentionModule:
    torch.manual_seed(seed)
    sam = SelfAttentionModule(channels)
    with torch.no_grad():
        sam.transform.weight.normal_()
    return sam.requires_grad_(False).eval()


def inputs(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        domain: {
            "logits": torch.randn(2, 5, 6, 7, generator=g, requires_grad=True),
            "features": torch.randn(2, 3, 6, 7, generator=g, requires_grad=True),
        }
        for domain in ("target", "source")
    }


COMBINATIONS = list(
    itertools.product(
        ["residual", "attended"],
        ["both", "target"],
        ["l2", "kl", "cosine"],
        ["prediction", "feature", "both"],
    )
)


@pytest.mark.parametrize(("target", "domains", "distance", "layer"), COMBINATIONS)
def test_values_and_gradients_match_the_functional_core_bit_for_bit(
    target: str, domains: str, distance: str, layer: str
) -> None:
    sam, feature_sam = trained_sam(5, 1), trained_sam(3, 2)
    loss = SelfAttentionLoss(
        sam,
        weight=0.1,
        target=target,  # type: ignore[arg-type]
        domains=domains,  # type: ignore[arg-type]
        distance=distance,  # type: ignore[arg-type]
        layer=layer,  # type: ignore[arg-type]
        feature_sam=feature_sam,
    )
    data = inputs()
    out = loss({d: v["logits"] for d, v in data.items()}, {d: v["features"] for d, v in data.items()})
    grads = torch.autograd.grad(out.total, [t for v in data.values() for t in v.values()], allow_unused=True)

    # The reference: each term composed of self_attention_loss calls, weighted as the sum of the terms.
    reference = inputs()

    def term(d: str) -> torch.Tensor:
        parts = []
        if layer in ("prediction", "both"):
            parts.append(self_attention_loss(reference[d]["logits"], sam, target=target, distance=distance))  # type: ignore[arg-type]
        if layer in ("feature", "both"):
            parts.append(
                self_attention_loss(reference[d]["features"], feature_sam, target=target, distance=distance)  # type: ignore[arg-type]
            )
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    chosen = ["target", "source"] if domains == "both" else ["target"]
    terms = {f"loss_sa_{d}": term(d) for d in chosen}
    total = 0.1 * sum(terms.values())
    assert isinstance(total, torch.Tensor)
    expected_grads = torch.autograd.grad(
        total, [t for v in reference.values() for t in v.values()], allow_unused=True
    )

    assert list(out.terms) == list(terms)
    for name, value in terms.items():
        assert torch.equal(out.terms[name], value), name
    assert torch.equal(out.total, total)
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
    assert loss.last_terms.keys() == terms.keys() and not any(
        t.requires_grad for t in loss.last_terms.values()
    )


def test_sam_gets_no_gradient_and_stays_in_eval_mode(tmp_path: Path) -> None:
    loss = SelfAttentionLoss(save_sam(trained_sam(5, 1), tmp_path / "sam.pt"))
    assert loss.sam is not None
    assert not loss.sam.training and not any(p.requires_grad for p in loss.sam.parameters())
    loss.train()
    assert loss.training and not loss.sam.training
    logits = inputs()["target"]["logits"]
    loss({"target": logits}).total.backward()
    assert logits.grad is not None and all(p.grad is None for p in loss.sam.parameters())
    assert loss.sources == {"sam": str(tmp_path / "sam.pt")}


def test_weight_zero_computes_the_terms_without_a_graph() -> None:
    logits = inputs()["target"]["logits"]
    weighted = SelfAttentionLoss(trained_sam(5, 1), weight=0.1)({"target": logits})
    unweighted = SelfAttentionLoss(trained_sam(5, 1), weight=0.0)({"target": logits})
    assert torch.equal(unweighted.terms["loss_sa_target"], weighted.terms["loss_sa_target"].detach())
    assert not unweighted.total.requires_grad and float(unweighted.total) == 0.0


def test_domains_target_uses_the_target_only() -> None:
    data = inputs()
    loss = SelfAttentionLoss(trained_sam(5, 1), domains="target")
    out = loss({"target": data["target"]["logits"], "source": data["source"]["logits"]})
    assert list(out.terms) == ["loss_sa_target"]
    with pytest.raises(ValueError, match=r"domains='target' got logits of the domains \['source'\]"):
        loss({"source": data["source"]["logits"]})


def test_feature_layer_needs_features_and_a_network_with_them() -> None:
    loss = SelfAttentionLoss(layer="feature", feature_sam=trained_sam(3, 2))
    assert loss.sam is None  # the prediction layer's SAM is neither needed nor built
    with pytest.raises(ValueError, match="needs the classifier's input features"):
        loss({"target": inputs()["target"]["logits"]})
    with pytest.raises(ValueError, match="needs a network with feature_channels"):
        loss.check_network(num_classes=5, feature_channels=None)
    loss.check_network(num_classes=5, feature_channels=3)


def test_imports_without_lightning() -> None:
    code = (
        "import sys\n"
        "from uda_sam.nn import SelfAttentionLoss\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
