"""The CUDA path: SAM kernels under bf16 autocast, bf16 self-training, pseudo labels, the toy configs on the GPU.

Marked ``cuda`` and skipped without a CUDA device; ``benchmarks/gpu_suite.py`` runs them (``pytest -m cuda``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL_TOY_RUN
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from uda_sam.callbacks import DivergenceMonitor, LastStepCheckpoint, PseudoLabelRegeneration
from uda_sam.cli.config_files import load_config
from uda_sam.cli.lightning import UDASamCLI
from uda_sam.data import Cityscapes, SegmentationTransform
from uda_sam.data.toy import make_toy_data
from uda_sam.nn import DeepLabV2, SelfAttentionLoss, SelfAttentionModule
from uda_sam.nn.sam_io import save_sam
from uda_sam.pseudo_labels.generation import generate_pseudo_labels
from uda_sam.tasks import SelfTraining

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]


def toy_network(seed: int = 0) -> DeepLabV2:
    """The toy configs' network: DeepLabV2-ResNet18, random weights, BatchNorm trained."""
    torch.manual_seed(seed)
    return DeepLabV2(19, backbone="resnet18", pretrained=None, freeze_bn=False)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def sam_outputs_and_gradients(
    module: SelfAttentionModule, logits: torch.Tensor, upstream: torch.Tensor, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(logits)`` (under bf16 autocast when ``bf16``) and the gradient of ``<output, upstream>``."""
    inputs = logits.detach().clone().requires_grad_(True)
    with torch.autocast(logits.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = module(inputs)
    (out.float() * upstream).sum().backward()
    assert inputs.grad is not None
    return out.detach(), inputs.grad


def test_sam_kernels_agree_under_bf16_autocast() -> None:
    """Blockwise and full kernels give the same bf16-autocast result, close to the fp32 reference (N = 8192)."""
    torch.manual_seed(0)
    full = SelfAttentionModule(19, impl="full").cuda()
    blockwise = SelfAttentionModule(19, impl="blockwise", block_size=1024).cuda()
    blockwise.load_state_dict(full.state_dict())
    logits = torch.randn(2, 19, 64, 128, device="cuda")
    upstream = torch.randn_like(logits)

    reference, reference_grad = sam_outputs_and_gradients(full, logits, upstream, bf16=False)
    out_full, grad_full = sam_outputs_and_gradients(full, logits, upstream, bf16=True)
    out_block, grad_block = sam_outputs_and_gradients(blockwise, logits, upstream, bf16=True)

    assert out_full.dtype == out_block.dtype == torch.float32  # the attention itself runs in fp32
    assert torch.isfinite(grad_full).all() and torch.isfinite(grad_block).all()
    # Same inputs to the attention (the 1x1 transform is the only bf16 operation): the kernels agree to fp32
    # summation order (the blockwise backward recomputes its blocks).
    assert relative_error(out_block, out_full) < 1e-5
    assert relative_error(grad_block, grad_full) < 1e-3
    # Against fp32 throughout: within bf16 rounding of the transform.
    assert relative_error(out_full, reference) < 2e-2
    assert relative_error(grad_full, reference_grad) < 2e-2


class LossRecorder(Callback):
    """The loss every training step returned."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def test_self_training_bf16_on_cuda(tmp_path: Path, toy_datamodule: Any) -> None:
    """20 steps of the toy's stage 2 (pseudo labels made on the GPU, frozen SAM) in bf16: finite, not diverging."""
    teacher = tmp_path / "teacher.ckpt"
    state = toy_network(seed=1).state_dict()
    torch.save({"state_dict": {f"network.{k}": v for k, v in state.items()}}, teacher)
    sam = save_sam(SelfAttentionModule(19), tmp_path / "sam.pt")
    task = SelfTraining(
        toy_network(),
        self_attention=SelfAttentionLoss(sam, weight=1e-4),
        optimizer="adam",
        lr=1e-3,
        num_val_images_logged=0,
    )
    recorder = LossRecorder()
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[
            PseudoLabelRegeneration(
                teacher_checkpoint=str(teacher), output_dir=str(tmp_path / "labels"), num_workers=0
            ),
            DivergenceMonitor(action="stop"),  # raises DivergenceError on a run-away loss or logit norm
            LastStepCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=10),
            recorder,
        ],
    )
    trainer.fit(task, datamodule=toy_datamodule(batch_size=2))

    assert trainer.strategy.root_device.type == "cuda"
    assert trainer.global_step == 20 and len(recorder.losses) == 20
    assert all(math.isfinite(loss) for loss in recorder.losses), recorder.losses
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "labels").glob("*/*/*.png"))  # generation 1's labels, made on the GPU


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Share of the pixels with the same label in two label sets of the same images."""
    assert a.keys() == b.keys() and a
    return sum(int((a[n] == b[n]).sum()) for n in a) / sum(label.size for label in a.values())


def test_pseudo_labels_on_cuda_agree_with_the_cpu(tmp_path: Path) -> None:
    """Labels made on the GPU in fp32 equal CPU-made ones on at least 99.9 % of the pixels.

    cuDNN's default TF32 convolutions round the inputs to 10 mantissa bits, which moves the confidence of some
    pixels of this random network across its class threshold (the median confidence, where pixels are densest): the
    strict comparison turns TF32 off; with the defaults the labels must still agree on 99.5 % of the pixels.
    """
    root = make_toy_data(tmp_path / "toy", num_source=1, num_target_train=8, num_val=1, num_test=1,
                         size=(256, 128), source_size=(64, 32), seed=0)  # fmt: skip
    dataset = Cityscapes(
        root / "cityscapes",
        split="train",
        labels="optional",
        transform=SegmentationTransform(size=(256, 128)),
    )
    network = toy_network(seed=2).eval()

    def make(device: str, folder: str) -> dict[str, np.ndarray]:
        copied = copy.deepcopy(network).to(device)  # the caller places the network
        result = generate_pseudo_labels(copied, dataset, tmp_path / folder, batch_size=4, num_workers=0,
                                        device=device, progress=False)  # fmt: skip
        return read_labels(result.label_dir)

    on_cpu = make("cpu", "cpu")
    assert len(on_cpu) == 8
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = agreement(on_cpu, make("cuda", "cuda_fp32"))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert fp32 >= 0.999, f"CUDA (fp32) and CPU labels agree on {100 * fp32:.3f} % of the pixels"
    default = agreement(on_cpu, make("cuda", "cuda_default"))
    assert default >= 0.995, (
        f"CUDA (default settings) and CPU labels agree on {100 * default:.3f} % of the pixels"
    )


def test_toy_configs_train_on_the_gpu(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's toy configs (``accelerator: auto``) train on the GPU when there is one.

    The config is read as shipped except for its W&B logger, which is dropped from a copy: a ``--trainer.logger``
    given after ``--config`` comes too late, since the config's logger is checked against ``WandbLogger``'s
    signature first, and that signature (``group``, ... passed on to ``wandb.init``) resolves only where wandb is
    installed.
    """
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy").symlink_to(toy_root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    shipped = load_config(REPO / "configs" / "toy" / "no_pseudo.yaml")  # with its _base_ files
    assert shipped["trainer"]["accelerator"] == "auto"
    shipped["trainer"]["logger"] = False
    config = tmp_path / "no_pseudo.yaml"
    config.write_text(yaml.safe_dump(shipped))
    cli = UDASamCLI(args=["fit", "--config", str(config), *SMALL_TOY_RUN])
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert cli.trainer.global_step == 2
    assert (tmp_path / "runs" / "toy" / "no_pseudo" / "checkpoints" / "last.ckpt").is_file()
