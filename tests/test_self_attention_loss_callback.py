"""SelfAttentionLossCallback: the self-attention loss added to a LightningModule that only exposes its logits."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from uda_sam import (
    SelfAttentionLossCallback,
    SelfAttentionModule,
    save_sam,
    segmentation_loss,
    self_attention_loss,
)

NUM_CLASSES = 5


def make_data(num: int = 4, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 3, 32, 64, generator=generator)
    masks = torch.randint(0, NUM_CLASSES, (num, 32, 64), generator=generator)
    return TensorDataset(images, masks)


class Host(LightningModule):
    """A method the callback knows nothing about: it only returns its logits next to its loss."""

    def __init__(self, network: nn.Module, lr: float = 0.1, return_logits: bool = True) -> None:
        super().__init__()
        self.network = network
        self.lr = lr
        self.return_logits = return_logits
        self.backpropagated: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        images, masks = batch
        logits = self.network(images)
        loss = segmentation_loss(logits, masks)
        self.log("train/loss_host", loss.detach())
        return {"loss": loss, "sam_logits": logits} if self.return_logits else loss

    def on_before_backward(self, loss: Tensor) -> None:
        self.backpropagated.append(float(loss.detach()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trained_sam(seed: int = 1) -> SelfAttentionModule:
    torch.manual_seed(seed)
    sam = SelfAttentionModule(NUM_CLASSES)
    with torch.no_grad():
        sam.transform.weight.normal_()
    return sam


def fit(host: LightningModule, callbacks: list[Callback], steps: int = 3, **kwargs: Any) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(host, DataLoader(make_data(), batch_size=2))
    return trainer


def test_weight_zero_leaves_losses_and_gradients_untouched(tiny_network: Callable) -> None:
    plain, monitored = (
        Host(tiny_network(num_classes=NUM_CLASSES)),
        Host(tiny_network(num_classes=NUM_CLASSES)),
    )
    fit(plain, [])
    trainer = fit(monitored, [SelfAttentionLossCallback(trained_sam(), weight=0.0)])
    assert monitored.backpropagated == plain.backpropagated
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a, b)
    assert float(trainer.callback_metrics["train/loss_sa"]) > 0  # computed and logged all the same


def test_loss_and_gradient_are_host_loss_plus_weighted_term(tiny_network: Callable) -> None:
    network, sam, weight, lr = tiny_network(num_classes=NUM_CLASSES), trained_sam(), 0.5, 0.1
    reference = copy.deepcopy(network)
    host = Host(network, lr=lr)
    fit(host, [SelfAttentionLossCallback(sam, weight=weight, target="attended", distance="kl")], steps=1)

    images, masks = make_data()[:2]
    logits = reference(images)
    expected = segmentation_loss(logits, masks) + weight * self_attention_loss(
        logits, sam, target="attended", distance="kl"
    )
    expected.backward()
    assert host.backpropagated[0] == pytest.approx(float(expected.detach()), rel=1e-6)
    for before, after in zip(reference.parameters(), network.parameters(), strict=True):
        torch.testing.assert_close(after, before.detach() - lr * before.grad, rtol=1e-5, atol=1e-6)


def test_sam_stays_frozen_outside_the_host(tiny_network: Callable, tmp_path: Path) -> None:
    sam_file = save_sam(trained_sam(), tmp_path / "sam.pt")
    callback = SelfAttentionLossCallback(str(sam_file), weight=0.1)
    before = copy.deepcopy(callback.sam.state_dict())
    host = Host(tiny_network(num_classes=NUM_CLASSES))
    trainer = fit(host, [callback])
    for key, value in callback.sam.state_dict().items():
        assert torch.equal(value, before[key])
    assert not callback.sam.training and not any(p.requires_grad for p in callback.sam.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in callback.sam.parameters()}
    assert not any(key.startswith("sam") for key in host.state_dict())
    assert "training_step" not in vars(host)  # the host gets its own training_step back after fit


@pytest.mark.parametrize(
    ("precision", "sam_dtype"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)]
)
def test_sam_follows_the_host_parameter_dtype(
    tiny_network: Callable, precision: str, sam_dtype: torch.dtype
) -> None:
    callback = SelfAttentionLossCallback(trained_sam(), weight=0.1)
    host = Host(tiny_network(num_classes=NUM_CLASSES))
    trainer = fit(host, [callback], steps=2, precision=precision)
    assert {p.dtype for p in callback.sam.parameters()} == {sam_dtype}
    assert torch.isfinite(trainer.callback_metrics["train/loss_sa"]) and len(host.backpropagated) == 2


def test_list_of_logits_adds_one_term_each(tiny_network: Callable) -> None:
    class TwoDomains(Host):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
            output = super().training_step(batch, batch_idx)
            return {"loss": output["loss"], "sam_logits": [output["sam_logits"], output["sam_logits"]]}

    single, double = (
        Host(tiny_network(num_classes=NUM_CLASSES)),
        TwoDomains(tiny_network(num_classes=NUM_CLASSES)),
    )
    fit(single, [SelfAttentionLossCallback(trained_sam(), weight=1.0)], steps=1)
    fit(double, [SelfAttentionLossCallback(trained_sam(), weight=1.0)], steps=1)
    host_only = Host(tiny_network(num_classes=NUM_CLASSES))
    fit(host_only, [], steps=1)
    term = single.backpropagated[0] - host_only.backpropagated[0]
    assert term > 0
    assert double.backpropagated[0] - host_only.backpropagated[0] == pytest.approx(2 * term, rel=1e-5)


def test_host_without_logits_fails_at_first_step_naming_the_hook(tiny_network: Callable) -> None:
    host = Host(tiny_network(num_classes=NUM_CLASSES), return_logits=False)
    with pytest.raises(ValueError, match=r"Host.training_step returned Tensor.*'sam_logits'"):
        fit(host, [SelfAttentionLossCallback(trained_sam())], steps=1)
    assert host.backpropagated == []  # nothing was trained
    assert "training_step" not in vars(host)


def test_class_count_mismatch(tiny_network: Callable, tmp_path: Path) -> None:
    sam_file = save_sam(trained_sam(), tmp_path / "sam.pt")
    # Found at fit start when the host declares num_classes ...
    declared = Host(tiny_network(num_classes=7))
    declared.num_classes = 7
    with pytest.raises(ValueError, match=r"num_classes=7 .*sam.pt.* 5 classes"):
        fit(declared, [SelfAttentionLossCallback(sam_file)], steps=1)
    # ... else at the first step, from the logits.
    with pytest.raises(ValueError, match=r"shape \(2, 7, 4, 8\).*sam.pt.*\(B, 5, h, w\)"):
        fit(Host(tiny_network(num_classes=7)), [SelfAttentionLossCallback(sam_file)], steps=1)


def test_manual_optimisation_is_refused_at_fit_start(tiny_network: Callable) -> None:
    class Manual(Host):
        def __init__(self, network: nn.Module) -> None:
            super().__init__(network)
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="manual optimisation.*manual_backward"):
        fit(
            Manual(tiny_network(num_classes=NUM_CLASSES)), [SelfAttentionLossCallback(trained_sam())], steps=1
        )


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SelfAttentionLossCallback(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        SelfAttentionLossCallback(trained_sam(), weight=-1.0)
    with pytest.raises(ValueError, match="target must be one of"):
        SelfAttentionLossCallback(trained_sam(), target="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sam must be a path"):
        SelfAttentionLossCallback(nn.Identity())  # type: ignore[arg-type]


class SaveWeights(Callback):
    """Rank 0 writes the network's weights after fit (objects do not come back from ddp_spawn)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.path)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_double_batch(
    tiny_network: Callable, tmp_path: Path
) -> None:
    # 2 processes x batch 1 see the same images per step as 1 process x batch 2, and DDP averages the gradients.
    results = {}
    for devices, batch_size in ((1, 2), (2, 1)):
        out = tmp_path / f"weights_{devices}.pt"
        trainer = Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices == 2 else "auto",
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=devices == 2,
            callbacks=[SelfAttentionLossCallback(trained_sam(), weight=1.0), SaveWeights(out)],
        )
        loader = DataLoader(make_data(), batch_size=batch_size, shuffle=False)
        trainer.fit(Host(tiny_network(num_classes=NUM_CLASSES)), loader)
        results[devices] = torch.load(out, weights_only=True)
    plain = Host(tiny_network(num_classes=NUM_CLASSES))
    fit(plain, [], steps=2)
    for key, value in results[1].items():
        torch.testing.assert_close(results[2][key], value, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(results[1][k], v) for k, v in plain.state_dict().items())
