"""The Lightning tasks: loss terms of docs/METHOD.md, frozen SAM, schedule/resume, generations, SAM files, evaluation."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from uda_sam.callbacks import PredictionWriter
from uda_sam.data.labels import CLASS_NAMES, TRAIN_ID_TO_LABEL_ID
from uda_sam.nn import SelfAttentionLoss, SelfAttentionModule, segmentation_loss
from uda_sam.nn.sam_io import network_state_dict, save_sam
from uda_sam.tasks import SAMPretraining, SegmentationTask, SelfTraining
from uda_sam.tasks.optim import lr_factor


def make_trainer(root: Path, max_steps: int = 2, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return Trainer(**options)


def sam_file(path: Path, channels: int = 19, layer: str = "prediction", seed: int = 1) -> Path:
    torch.manual_seed(seed)
    return save_sam(SelfAttentionModule(channels), path, layer=layer)  # type: ignore[arg-type]


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def fake_batch(seed: int = 0) -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)

    def sample(h: int, w: int) -> dict[str, Any]:
        mask = torch.randint(0, 19, (1, h, w), generator=g)
        mask[:, : h // 4] = 255
        return {"image": torch.randn(1, 3, h, w, generator=g), "mask": mask, "name": ["x"]}

    return {"source": sample(40, 72), "target": sample(32, 64)}


def up(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=True)


def capture_losses(task: SegmentationTask) -> dict[str, Any]:
    captured: dict[str, Any] = {}

    def record(
        total: torch.Tensor, terms: dict[str, torch.Tensor], batch_size: int, logits: Any = None
    ) -> None:
        captured.update(total=total, terms=terms, logits=logits)

    task.log_losses = record  # type: ignore[method-assign]
    return captured


# ------------------------------------------------------------------------------------------ loss terms
@pytest.mark.parametrize(
    ("target", "domains"),
    [("residual", "both"), ("attended", "both"), ("residual", "target"), ("attended", "target")],
)
def test_self_training_loss_matches_method(tmp_path: Path, tiny_network, target: str, domains: str) -> None:
    path = sam_file(tmp_path / "sam.pt")
    loss = SelfAttentionLoss(path, weight=0.1, target=target, domains=domains)  # type: ignore[arg-type]
    task = SelfTraining(tiny_network(), self_attention=loss)
    captured = capture_losses(task)
    batch = fake_batch()
    total = task.training_step(batch, 0)

    net, sam = task.network, loss.sam
    assert sam is not None
    src, tgt = batch["source"], batch["target"]
    p_s, p_t = net(src["image"]), net(tgt["image"])

    def l_sa(p: torch.Tensor) -> torch.Tensor:  # eq. (8) / (9): MSE to the detached SAM target
        with torch.no_grad():
            goal = p + sam(p) if target == "residual" else sam(p)
        return ((p - goal) ** 2).mean()

    seg_s = segmentation_loss(up(p_s, src["mask"]), src["mask"])
    seg_t = segmentation_loss(up(p_t, tgt["mask"]), tgt["mask"])
    attention = l_sa(p_t) + (l_sa(p_s) if domains == "both" else 0.0)
    torch.testing.assert_close(total, seg_s + seg_t + 0.1 * attention)
    expected_terms = {"loss_seg_source", "loss_seg_target", "loss_sa_target"} | (
        {"loss_sa_source"} if domains == "both" else set()
    )
    assert set(captured["terms"]) == expected_terms
    torch.testing.assert_close(captured["terms"]["loss_sa_target"], l_sa(p_t))
    total.backward()
    assert all(p.grad is None for p in sam.parameters())  # frozen: no gradient reaches the SAM
    assert all(p.grad is not None for p in net.parameters())


def test_pseudo_only_and_no_pseudo_losses(tmp_path: Path, tiny_network) -> None:
    batch = fake_batch(1)
    src, tgt = batch["source"], batch["target"]
    pseudo_only = SelfTraining(tiny_network())
    assert pseudo_only.self_attention is None
    captured = capture_losses(pseudo_only)
    total = pseudo_only.training_step(batch, 0)
    net = pseudo_only.network
    expected = segmentation_loss(up(net(src["image"]), src["mask"]), src["mask"]) + segmentation_loss(
        up(net(tgt["image"]), tgt["mask"]), tgt["mask"]
    )
    torch.testing.assert_close(total, expected)
    assert set(captured["terms"]) == {"loss_seg_source", "loss_seg_target"}

    no_pseudo = SelfTraining(tiny_network(), use_target=False)
    captured = capture_losses(no_pseudo)
    total = no_pseudo.training_step({"source": src}, 0)  # the target batch is not needed
    torch.testing.assert_close(
        total, segmentation_loss(up(no_pseudo.network(src["image"]), src["mask"]), src["mask"])
    )
    assert set(captured["terms"]) == {"loss_seg_source"}


def test_joint_forward_shares_batchnorm_statistics(tmp_path: Path) -> None:
    """One pass over the source window and the target batch: the loss is that of the concatenated batch, and
    BatchNorm's running statistics take one update per step, from both domains."""
    from uda_sam.nn import DilatedFCN

    batch = fake_batch(2)
    src, tgt = batch["source"], batch["target"]
    torch.manual_seed(0)
    task = SelfTraining(DilatedFCN(width=8), joint_forward=True)
    reference = DilatedFCN(width=8)
    reference.load_state_dict(task.network.state_dict())
    task.train()
    reference.train()
    captured = capture_losses(task)

    torch.manual_seed(5)
    total = task.training_step(batch, 0)
    torch.manual_seed(5)  # the same window: the source is 72x40, the target 64x32
    top, left = int(torch.randint(40 - 32 + 1, ()).item()), int(torch.randint(72 - 64 + 1, ()).item())
    image = src["image"][..., top : top + 32, left : left + 64]
    mask = src["mask"][..., top : top + 32, left : left + 64]
    logits = reference(torch.cat([image, tgt["image"]]))
    expected = segmentation_loss(reference.upsample_logits(logits[:1], (32, 64)), mask) + segmentation_loss(
        reference.upsample_logits(logits[1:], (32, 64)), tgt["mask"]
    )
    torch.testing.assert_close(total, expected)
    assert set(captured["terms"]) == {"loss_seg_source", "loss_seg_target"}
    counters = [
        m.num_batches_tracked.item() for m in task.network.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert counters and all(count == 1 for count in counters)
    for mine, theirs in zip(task.network.modules(), reference.modules(), strict=True):
        if isinstance(mine, torch.nn.BatchNorm2d):
            torch.testing.assert_close(mine.running_mean, theirs.running_mean)

    separate = SelfTraining(DilatedFCN(width=8))
    separate.train()
    capture_losses(separate)
    separate.training_step(batch, 0)
    counters = [
        m.num_batches_tracked.item()
        for m in separate.network.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert all(count == 2 for count in counters)  # one update per domain, the target's last


def test_joint_forward_with_the_self_attention_loss(tmp_path: Path, tiny_network) -> None:
    """The SAM loss gets each domain's own logits from the joint pass; without a source there is nothing to join."""
    path = sam_file(tmp_path / "sam.pt")
    batch = fake_batch(3)
    batch["source"] = {**batch["source"], "image": batch["source"]["image"][..., :32, :64],
                       "mask": batch["source"]["mask"][..., :32, :64]}  # fmt: skip
    loss = SelfAttentionLoss(path, weight=0.1, domains="both")
    joint = SelfTraining(tiny_network(), self_attention=loss, joint_forward=True)
    captured = capture_losses(joint)
    total = joint.training_step(batch, 0)
    separate = SelfTraining(
        tiny_network(), self_attention=SelfAttentionLoss(path, weight=0.1, domains="both")
    )
    # The tiny network has no BatchNorm: one pass and two give the same objective.
    torch.testing.assert_close(total, separate.compute_losses(batch)[0])
    assert {"loss_sa_source", "loss_sa_target"} <= set(captured["terms"])

    oracle = SelfTraining(tiny_network(), use_source=False, joint_forward=True)
    torch.testing.assert_close(
        oracle.compute_losses(batch)[0],
        segmentation_loss(up(oracle.network(batch["target"]["image"]), batch["target"]["mask"]),
                          batch["target"]["mask"]),
    )  # fmt: skip


def test_joint_forward_refuses_a_smaller_source(tiny_network) -> None:
    batch = fake_batch(4)
    batch["target"] = {**batch["target"], "image": torch.randn(1, 3, 48, 64)}
    task = SelfTraining(tiny_network(), joint_forward=True)
    with pytest.raises(ValueError, match="joint_forward needs source images at least as large"):
        task.compute_losses(batch)


@pytest.mark.parametrize("distance", ["kl", "cosine"])
def test_self_training_distance_variants(tmp_path: Path, tiny_network, distance: str) -> None:
    path = sam_file(tmp_path / "sam.pt")
    loss = SelfAttentionLoss(path, distance=distance, domains="target")  # type: ignore[arg-type]
    task = SelfTraining(tiny_network(), self_attention=loss, use_target=False)
    captured = capture_losses(task)
    batch = fake_batch(2)
    total = task.training_step(batch, 0)
    p = task.network(batch["target"]["image"])
    assert loss.sam is not None
    with torch.no_grad():
        goal = p + loss.sam(p)
    if distance == "kl":  # KL(softmax(P~_i) || softmax(P_i)) per pixel row
        q = goal.softmax(1)
        expected = (q * (goal.log_softmax(1) - p.log_softmax(1))).sum(1).mean()
    else:
        expected = (1 - F.cosine_similarity(p, goal, dim=1)).mean()
    torch.testing.assert_close(captured["terms"]["loss_sa_target"], expected)
    seg_s = segmentation_loss(
        up(task.network(batch["source"]["image"]), batch["source"]["mask"]), batch["source"]["mask"]
    )
    torch.testing.assert_close(total, seg_s + 0.1 * expected)


@pytest.mark.parametrize("layer", ["feature", "both"])
def test_self_training_feature_layer(tmp_path: Path, tiny_network, layer: str) -> None:
    feature_path = sam_file(tmp_path / "feature_sam.pt", channels=8, layer="feature", seed=3)
    sam_path = str(sam_file(tmp_path / "sam.pt")) if layer == "both" else None
    loss = SelfAttentionLoss(sam_path, layer=layer, feature_sam=str(feature_path), domains="target")  # type: ignore[arg-type]
    task = SelfTraining(tiny_network(), self_attention=loss)
    captured = capture_losses(task)
    batch = fake_batch(3)
    task.training_step(batch, 0)
    logits, features = task.network(batch["target"]["image"], return_features=True)
    assert loss.feature_sam is not None
    with torch.no_grad():
        expected = F.mse_loss(features, features + loss.feature_sam(features))
        if layer == "both":
            assert loss.sam is not None
            expected = expected + F.mse_loss(logits, logits + loss.sam(logits))
    torch.testing.assert_close(captured["terms"]["loss_sa_target"], expected)


@pytest.mark.parametrize(("skip", "layer"), [(True, "prediction"), (False, "prediction"), (True, "feature")])
def test_sam_pretraining_loss(tiny_network, skip: bool, layer: str) -> None:
    task = SAMPretraining(tiny_network(), skip_connection=skip, layer=layer)
    capture_losses(task)
    batch = fake_batch(4)
    src = batch["source"]
    loss = task.training_step(batch, 0)
    net, sam = task.network, task.sam
    if layer == "prediction":
        p = net(src["image"])
        out = p + sam(p) if skip else sam(p)
    else:
        _, feats = net(src["image"], return_features=True)
        out = net.classifier(feats + sam(feats))
    torch.testing.assert_close(loss, segmentation_loss(up(out, src["mask"]), src["mask"]))
    loss.backward()
    assert all(p.grad is not None for p in sam.parameters())  # trained jointly
    groups = task.optimizer_param_groups()
    assert {id(p) for p in sam.parameters()} <= {id(p) for g in groups for p in g["params"]}


# --------------------------------------------------------------------------------------- frozen SAM
class ModeCheck(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        sam = pl_module.self_attention.sam  # type: ignore[union-attr]
        assert pl_module.network.training and pl_module.self_attention.training and not sam.training
        self.calls += 1


def test_sam_frozen_bit_identical(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    task = SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(sam_file(tmp_path / "sam.pt")))
    sam = task.self_attention.sam
    assert sam is not None
    sam_before, net_before = state_copy(sam), state_copy(task.network)
    check = ModeCheck()
    make_trainer(tmp_path, max_steps=2, callbacks=[check], limit_val_batches=1, val_check_interval=2).fit(
        task, datamodule=toy_datamodule()
    )
    assert check.calls == 2
    assert_same_state(sam_before, state_copy(sam))
    assert not all(torch.equal(net_before[k], v) for k, v in state_copy(task.network).items())
    optimised = {id(p) for g in task.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in sam.parameters()}


# ------------------------------------------------------------------------------ schedule and resume
class LRRecorder(Callback):
    def __init__(self) -> None:
        self.records: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.records[trainer.global_step] = [g["lr"] for g in trainer.optimizers[0].param_groups]


class NewGeneration(Callback):
    def __init__(self, at_step: int, reinitialize: bool = True) -> None:
        self.at_step = at_step
        self.reinitialize = reinitialize
        self.checked = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step != self.at_step:
            return
        optimizer = trainer.optimizers[0]
        before = state_copy(pl_module.network)
        assert optimizer.state  # momentum buffers exist
        pl_module.start_new_generation(reinitialize_network=self.reinitialize)
        if self.reinitialize:
            assert_same_state(pl_module._initial_network_state, state_copy(pl_module.network))
        else:
            assert_same_state(before, state_copy(pl_module.network))
        assert not optimizer.state
        assert pl_module.schedule_origin == self.at_step
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([pl_module.lr, pl_module.lr * 10])
        self.checked = True


def test_poly_schedule_follows_global_step(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    recorder = LRRecorder()
    task = SegmentationTask(tiny_network(), lr=0.01)
    make_trainer(tmp_path, max_steps=4, callbacks=[recorder]).fit(task, datamodule=toy_datamodule())
    for step, lrs in recorder.records.items():
        factor = (1 - step / 4) ** 0.9
        assert lrs == pytest.approx([0.01 * factor, 0.1 * factor])


@pytest.mark.parametrize("reinitialize", [True, False])
def test_start_new_generation_resets(
    tmp_path: Path, tiny_network, toy_datamodule, reinitialize: bool
) -> None:
    generation = NewGeneration(at_step=2, reinitialize=reinitialize)
    recorder = LRRecorder()
    task = SelfTraining(tiny_network(), lr=0.01, schedule_steps=4)
    make_trainer(tmp_path, max_steps=4, callbacks=[generation, recorder]).fit(
        task, datamodule=toy_datamodule()
    )
    assert generation.checked
    assert recorder.records[3] == pytest.approx(
        [0.01 * 0.75**0.9, 0.1 * 0.75**0.9]
    )  # one step into the new schedule


def test_resume_continues_step_and_schedule(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    def run(root: Path, ckpt_path: str | None) -> tuple[LRRecorder, SelfTraining]:
        recorder = LRRecorder()
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
        )
        task = SelfTraining(tiny_network(), lr=0.01)
        trainer = make_trainer(
            root,
            max_steps=5,
            callbacks=[NewGeneration(at_step=1), recorder, checkpoints],
            enable_checkpointing=True,
        )
        trainer.fit(task, datamodule=toy_datamodule(), ckpt_path=ckpt_path)
        return recorder, task

    full, _ = run(tmp_path / "a", None)
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    assert ckpt.is_file()
    torch.load(ckpt, weights_only=True)  # plain tensors and containers only
    resumed, task = run(tmp_path / "b", str(ckpt))
    assert min(resumed.records) == 2  # continues at the saved step
    assert task.schedule_origin == 1 and task.global_step == 5
    for step in (2, 3, 4):
        assert resumed.records[step] == pytest.approx(full.records[step], rel=1e-12)
    assert full.records[2] == pytest.approx([0.01 * lr_factor(1, "poly", 5), 0.1 * lr_factor(1, "poly", 5)])


def test_optimizer_and_schedule_choices(tiny_network) -> None:
    task = SegmentationTask(
        tiny_network(), optimizer="adam", lr=1e-5, betas=(0.9, 0.99), lr_schedule="step", step_size=2
    )
    config = task.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.9, 0.99)
    assert config["lr_scheduler"]["interval"] == "step"
    assert [lr_factor(s, "step", step_size=2, gamma=0.1) for s in range(5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    with pytest.raises(ValueError, match="schedule_steps"):
        SegmentationTask(
            tiny_network()
        ).configure_optimizers()  # poly without trainer.max_steps or schedule_steps


# ------------------------------------------------------------------------------------------ SAM files
def test_sam_export_round_trip(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    task = SAMPretraining(tiny_network(), lr=0.01)
    initial_sam = state_copy(task.sam)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, max_steps=2, callbacks=[checkpoints], enable_checkpointing=True).fit(
        task, datamodule=toy_datamodule()
    )
    exported = tmp_path / "sam.pt"  # default: <default_root_dir>/sam.pt without a logger
    payload = torch.load(exported, weights_only=True)
    assert set(payload) == {
        "state_dict",
        "num_classes",
        "embed_channels",
        "kernel_size",
        "use_conv",
        "layer",
        "attention_quality",
    }
    assert payload["num_classes"] == 19 and payload["layer"] == "prediction"
    trained = state_copy(task.sam)
    assert not torch.equal(
        trained["transform.weight"], initial_sam["transform.weight"]
    )  # the SAM was trained

    from_file = SelfAttentionLoss(exported)
    from_ckpt = SelfAttentionLoss(str(tmp_path / "ckpt" / "last.ckpt"))
    assert from_file.sam is not None and from_ckpt.sam is not None
    assert_same_state(trained, state_copy(from_file.sam))
    assert_same_state(trained, state_copy(from_ckpt.sam))
    assert_same_state(state_copy(task.network), network_state_dict(tmp_path / "ckpt" / "last.ckpt"))


def test_no_conv_sam_needs_no_file(tiny_network) -> None:
    task = SelfTraining(
        tiny_network(), self_attention=SelfAttentionLoss(SelfAttentionModule(19, use_conv=False))
    )
    sam = task.self_attention.sam  # type: ignore[union-attr]
    assert sam is not None and not sam.use_conv and not list(sam.parameters())


def test_self_training_checkpoint_resumes_and_serves_as_sam_file(
    tmp_path: Path, tiny_network, toy_datamodule
) -> None:
    loss = SelfAttentionLoss(sam_file(tmp_path / "sam.pt"))
    task = SelfTraining(tiny_network(), self_attention=loss)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        task, datamodule=toy_datamodule()
    )
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["self_attention"]["weight"] == 0.1
    assert {k for k in checkpoint["state_dict"] if "sam" in k} == {
        "self_attention.sam.transform.weight",
        "self_attention.sam.transform.bias",
    }
    reloaded = SelfAttentionLoss(str(tmp_path / "ckpt" / "last.ckpt")).sam
    assert loss.sam is not None and reloaded is not None
    assert_same_state(state_copy(loss.sam), state_copy(reloaded))
    # A stage-2 checkpoint resumes: its frozen SAM loads back into the configured loss.
    resumed = SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(sam_file(tmp_path / "sam.pt")))
    make_trainer(tmp_path, max_steps=2).fit(
        resumed, datamodule=toy_datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.global_step == 2


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing", FileNotFoundError, r"SelfAttentionLoss\.sam: .*missing\.pt does not exist"),
        ("other_classes", ValueError, r"SelfAttentionLoss\.sam: .*5 input channels.*19 classes"),
        ("network_checkpoint", ValueError, r"SelfAttentionLoss\.sam: .*not a SAM file nor a SAM checkpoint"),
        ("not_torch", ValueError, r"SelfAttentionLoss\.sam: cannot read"),
        ("feature_sam", ValueError, r"SelfAttentionLoss\.sam: .*'feature' layer"),
    ],
)
def test_bad_sam_path(tmp_path: Path, tiny_network, case: str, error: type[Exception], match: str) -> None:
    path = tmp_path / f"{case}.pt"
    if case == "other_classes":
        sam_file(path, channels=5)
    elif case == "network_checkpoint":
        torch.save({"state_dict": {"network.classifier.weight": torch.zeros(19, 8, 1, 1)}, "epoch": 0}, path)
    elif case == "not_torch":
        path.write_text("not a checkpoint")
    elif case == "feature_sam":
        sam_file(path, channels=8, layer="feature")
    with pytest.raises(error, match=match):
        SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(str(path)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "residuals"}, r"SelfAttentionLoss.target must be one of \['residual', 'attended'\]"),
        ({"domains": "source"}, "SelfAttentionLoss.domains"),
        ({"distance": "l1"}, "SelfAttentionLoss.distance"),
        ({"layer": "logits"}, "SelfAttentionLoss.layer"),
        ({"weight": -1.0}, "SelfAttentionLoss: weight must be >= 0"),
        ({}, r"SelfAttentionLoss.sam is required with layer='prediction'"),
        (
            {"layer": "feature", "sam": "sam.pt"},
            r"SelfAttentionLoss.feature_sam is required with layer='feature'",
        ),
        ({"sam": 19}, "SelfAttentionLoss.sam must be a path"),
    ],
)
def test_bad_self_attention_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfAttentionLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"val_class_subsets": ["12"]}, "val_class_subsets"),
        ({"use_source": False, "use_target": False}, "nothing to train on"),
        (
            {"self_attention": SelfAttentionModule(19)},
            "self_attention must be a uda_sam.nn.SelfAttentionLoss",
        ),
        (
            {"self_attention": SelfAttentionLoss(feature_sam=SelfAttentionModule(5), layer="feature")},
            "SelfAttentionLoss.feature_sam: .*5 input channels.*network has 8 feature channels",
        ),
    ],
)
def test_bad_options(tiny_network, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfTraining(tiny_network(), **kwargs)


class _DuckTypedNetwork(torch.nn.Module):
    """Has the attributes a network needs, but is no SegmentationNetwork."""

    num_classes = 19

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def upsample_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits, size=size)

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": lr}]


@pytest.mark.parametrize("network", [_DuckTypedNetwork(), torch.nn.Conv2d(3, 19, 1)])
def test_a_network_outside_the_contract_is_refused(network: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"network must be a uda_sam\.nn\.SegmentationNetwork .*; got .*"):
        SegmentationTask(network)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SegmentationNetwork"):
        SelfTraining(network)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ evaluation and media
def test_validation_logs_miou_subsets(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    task = SelfTraining(tiny_network(), val_class_subsets=["16", "13"])
    trainer = make_trainer(tmp_path, limit_val_batches=None)
    trainer.validate(task, datamodule=toy_datamodule(target_size=(32, 16)))
    metrics = trainer.callback_metrics
    assert float(metrics["val/mIoU"]) == float(metrics["val/mIoU_16"])
    assert {"val/mIoU_13", "val/loss", *(f"val/iou/{n}" for n in CLASS_NAMES)} <= set(metrics)
    assert "val/mIoU_19" not in metrics
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that records media calls instead of starting a W&B run."""

    def __init__(self) -> None:
        super().__init__(project="test", offline=True)
        self.media: dict[str, dict[str, Any]] = {}

    @property
    def experiment(self) -> Any:  # never start a (global) W&B run from a unit test
        return None

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.media[key] = {"images": images, "step": step, **kwargs}

    def log_table(
        self, key: str, columns: Any = None, data: Any = None, dataframe: Any = None, step: Any = None
    ) -> None:
        self.media[key] = {"columns": columns, "data": data, "step": step}


def test_wandb_table_and_images(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    logger = RecordingWandbLogger()
    task = SegmentationTask(tiny_network(), num_val_images_logged=2)
    trainer = make_trainer(tmp_path, logger=logger, limit_val_batches=None)
    trainer.validate(task, datamodule=toy_datamodule())
    table = logger.media["val/iou_table"]
    assert table["columns"] == ["trainId", "class", "IoU (%)"]
    assert [row[1] for row in table["data"][:19]] == list(CLASS_NAMES) and table["data"][19][1] == "mIoU (19)"
    images = logger.media["val/predictions"]
    assert len(images["images"]) == 2 and len(images["caption"]) == 2
    mask = images["masks"][0]
    assert mask["prediction"]["mask_data"].shape == images["images"][0].shape[:2]
    assert mask["ground_truth"]["class_labels"][0] == "road"
    assert logger.media["val/predictions_color"]["images"][0].shape[1] == 3 * images["images"][0].shape[1]


def test_predict_writes_label_id_and_color_pngs(
    tmp_path: Path, tiny_network, toy_datamodule, toy_root: Path
) -> None:
    from uda_sam.evaluation.scoring import evaluate_folder

    out = tmp_path / "pred"
    trainer = make_trainer(tmp_path, callbacks=[PredictionWriter(str(out))])
    # Images at half size: predictions must still come back at the original 64x32.
    trainer.predict(
        SegmentationTask(tiny_network()),
        datamodule=toy_datamodule(target_size=(32, 16)),
        return_predictions=False,
    )
    gt = sorted((toy_root / "cityscapes" / "gtFine" / "val").glob("*/*_labelIds.png"))
    label_files = sorted((out / "labelIds").glob("*/*_labelIds.png"))
    assert len(label_files) == len(gt) == 2
    valid_ids = set(TRAIN_ID_TO_LABEL_ID[:19].tolist())
    for path in label_files:
        image = Image.open(path)
        assert image.mode == "L" and image.size == (64, 32)
        assert set(np.unique(np.asarray(image)).tolist()) <= valid_ids
        color = Image.open(out / "color" / path.parent.name / path.name.replace("_labelIds", "_color"))
        assert color.mode == "RGB" and color.size == (64, 32)
    result = evaluate_folder(out / "labelIds", toy_root / "cityscapes")
    assert result["num_images"] == 2 and not math.isnan(float(result["mIoU_19"]))


def test_bf16_mixed_step(tmp_path: Path, tiny_network, toy_datamodule) -> None:
    task = SelfTraining(tiny_network(), self_attention=SelfAttentionLoss(sam_file(tmp_path / "sam.pt")))
    trainer = make_trainer(tmp_path, max_steps=1, precision="bf16-mixed", log_every_n_steps=1)
    trainer.fit(task, datamodule=toy_datamodule())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert {"train/loss_sa_source", "train/loss_sa_target", "train/lr_backbone"} <= set(
        trainer.callback_metrics
    )


def test_logged_learning_rate_is_the_one_of_the_written_step(
    tiny_network, toy_datamodule, tmp_path: Path
) -> None:
    # The learning rate is logged only on the steps the logger writes; each written value must be that step's rate,
    # not one left over from an earlier step.
    from lightning.pytorch.loggers import CSVLogger

    recorder = LRRecorder()
    task = SelfTraining(tiny_network(), lr=0.01, schedule_steps=12)
    trainer = make_trainer(
        tmp_path,
        max_steps=12,
        log_every_n_steps=4,
        callbacks=[recorder],
        logger=CSVLogger(tmp_path, name="csv"),
    )
    trainer.fit(task, datamodule=toy_datamodule())
    rows = [
        row
        for row in csv.DictReader(open(next(tmp_path.rglob("metrics.csv"))))
        if row.get("train/lr_backbone")
    ]
    assert len(rows) == 3
    for row in rows:
        # A row written after the optimiser step of training step k carries step k.
        assert float(row["train/lr_backbone"]) == pytest.approx(
            recorder.records[int(row["step"])][0], rel=1e-6
        )


def test_checkpoint_for_a_prediction_without_the_frozen_sam(
    tmp_path: Path, tiny_network, toy_datamodule
) -> None:
    """Checkpoints hold the network's configuration; a SelfTraining built for a prediction (no SAM, no file)
    predicts from a checkpoint with a frozen SAM as the trained task does; only a prediction drops the SAM's weights."""
    task = SelfTraining(
        tiny_network(), self_attention=SelfAttentionLoss(str(sam_file(tmp_path / "sam.pt")), weight=0.1)
    )
    task.network_config = {"class_path": "conftest.TinySegNet", "init_args": {"feature_channels": 8}}
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(task, datamodule=toy_datamodule())
    trainer.save_checkpoint(tmp_path / "ours.ckpt")
    saved = torch.load(tmp_path / "ours.ckpt", weights_only=True)
    assert saved["uda_sam"]["network"] == task.network_config
    assert any(key.startswith("self_attention.sam.") for key in saved["state_dict"])

    predictor = SelfTraining(tiny_network(seed=5), **SelfTraining.prediction_overrides())
    assert predictor.self_attention is None
    ckpt = str(tmp_path / "ours.ckpt")
    predicted = make_trainer(tmp_path).predict(predictor, datamodule=toy_datamodule(), ckpt_path=ckpt)
    expected = make_trainer(tmp_path).predict(task, datamodule=toy_datamodule())
    assert predicted is not None and expected is not None
    for ours, theirs in zip(predicted, expected, strict=True):
        assert torch.equal(ours["pred"], theirs["pred"])
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*self_attention\.sam\."):
        make_trainer(tmp_path, limit_test_batches=1).test(
            predictor, datamodule=toy_datamodule(), ckpt_path=ckpt
        )
