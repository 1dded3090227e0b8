"""Every network implements SegmentationNetwork: logits at its output stride, upsampling, optimiser groups, weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_sam.nn import DeepLabV2, DilatedFCN, FCN8s, SegmentationNetwork
from uda_sam.nn.sam_io import load_network_weights

CLASSES = 3

#: Networks whose logits are exactly ``ceil(side / output_stride)`` per side (the caffe styles pad and crop, and are
#: checked against their reference networks in test_deeplab_files.py and test_fcn8s_files.py, which also load
#: FCN-8s files of both styles through load_weights: its 134 M parameters are too many to save here once more).
NETWORKS: dict[str, Callable[[], SegmentationNetwork]] = {
    "deeplabv2": lambda: DeepLabV2(num_classes=CLASSES, backbone="resnet18"),
    "deeplabv2-unfrozen-bn": lambda: DeepLabV2(num_classes=CLASSES, backbone="resnet18", freeze_bn=False),
    "fcn8s": lambda: FCN8s(num_classes=CLASSES),
    "dilated-fcn": lambda: DilatedFCN(num_classes=CLASSES, width=8),
    "dilated-fcn-frozen-bn": lambda: DilatedFCN(num_classes=CLASSES, width=8, freeze_bn=True),
}


def builder(name: str) -> Callable[..., SegmentationNetwork]:
    def build(seed: int = 0) -> SegmentationNetwork:
        torch.manual_seed(seed)
        return NETWORKS[name]()

    return build


@pytest.fixture(params=sorted(NETWORKS))
def make(request: pytest.FixtureRequest) -> Callable[..., SegmentationNetwork]:
    return builder(request.param)


@pytest.fixture(params=sorted(name for name in NETWORKS if name != "fcn8s"))
def make_small(request: pytest.FixtureRequest) -> Callable[..., SegmentationNetwork]:
    return builder(request.param)


def randomize(network: nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic away from its initial value (score layers start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in network.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) * 0.1 + 0.5)


def test_forward_gives_logits_at_the_output_stride(make: Callable[..., SegmentationNetwork]) -> None:
    network = make().eval()
    assert isinstance(network, SegmentationNetwork) and network.num_classes == CLASSES
    height, width = 50, 70  # not multiples of the stride
    with torch.no_grad():
        logits, features = network(torch.randn(2, 3, height, width), return_features=True)
    stride = network.output_stride
    assert logits.shape == (2, CLASSES, math.ceil(height / stride), math.ceil(width / stride))
    assert features.shape[:2] == (2, network.feature_channels)
    for size in ((height, width), (2 * height, 2 * width)):
        assert network.upsample_logits(logits, size).shape == (2, CLASSES, *size)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        network(torch.randn(2, 1, height, width))
    with pytest.raises(ValueError, match="size must be a"):
        network.upsample_logits(logits, (0, width))


def test_param_groups_hold_every_trainable_parameter_once(make: Callable[..., SegmentationNetwork]) -> None:
    network = make()
    groups = network.param_groups(lr=0.5, classifier_lr_mult=4.0)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 0.5), ("classifier", 2.0)]
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in network.parameters() if p.requires_grad}
    head = {id(p) for p in network.classifier_parameters() if p.requires_grad}
    assert head and {id(p) for p in groups[1]["params"]} == head
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_weights_round_trip_through_load_weights(
    make_small: Callable[..., SegmentationNetwork], tmp_path: Path
) -> None:
    make = make_small
    trained = make(seed=1)
    randomize(trained, seed=2)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    exported, checkpoint = tmp_path / "exported.pt", tmp_path / "last.ckpt"
    torch.save(state, exported)
    task_state = {f"network.{k}": v for k, v in state.items()} | {"sam.transform.weight": torch.zeros(1)}
    torch.save({"state_dict": task_state, "global_step": 3}, checkpoint)
    for file in (exported, checkpoint):
        network = make(seed=3)
        network.load_weights(file)
        assert network.state_dict().keys() == state.keys()
        assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items()), file.name
    # The functional form reads the same way.
    network = make(seed=3)
    load_network_weights(network, checkpoint, option="teacher_checkpoint")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())


def test_a_file_that_does_not_fit_names_the_option_and_the_file(
    make_small: Callable[..., SegmentationNetwork], tmp_path: Path
) -> None:
    network = make_small()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    other = tmp_path / "other_classes.pt"
    torch.save({k: v[:1] if "classifier" in k or "score" in k else v for k, v in before.items()}, other)
    with pytest.raises(ValueError, match=r"^teacher_checkpoint: .*other_classes\.pt"):
        network.load_weights(other, option="teacher_checkpoint")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded
    sam_only = tmp_path / "sam.ckpt"
    torch.save({"state_dict": {"sam.transform.weight": torch.zeros(1)}}, sam_only)
    with pytest.raises(ValueError, match=r"^teacher_checkpoint: .*sam\.ckpt holds no network weights"):
        network.load_weights(sam_only, option="teacher_checkpoint")
    with pytest.raises(
        FileNotFoundError, match=r"^teacher_checkpoint: weights file .*missing\.pt' does not exist"
    ):
        network.load_weights(tmp_path / "missing.pt", option="teacher_checkpoint")


class _Classifier(SegmentationNetwork):
    """The smallest network under the contract: a 1x1 convolution on a 2x average pooling."""

    output_stride = 2

    def __init__(self) -> None:
        super().__init__()
        self.num_classes, self.feature_channels = CLASSES, 3
        self.classifier = nn.Conv2d(3, CLASSES, 1)

    def forward(self, images: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features = F.avg_pool2d(images, 2, ceil_mode=True)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits

    def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(logits, size=size, mode="nearest")

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        return self.classifier.parameters()


def test_a_network_of_ones_own_gets_groups_and_weights_from_the_base(tmp_path: Path) -> None:
    network = _Classifier()
    assert [len(g["params"]) for g in network.param_groups(1.0)] == [0, 2]
    torch.save(network.state_dict(), tmp_path / "own.pt")
    copy = _Classifier()
    copy.load_weights(tmp_path / "own.pt")
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in network.state_dict().items())
    torch.save({"classifier.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "wrong.pt")
    with pytest.raises(
        ValueError,
        match=r"wrong\.pt' does not fit _Classifier\(num_classes=3\): 1 tensors of another shape "
        r"\['classifier\.weight'\], 1 missing \['classifier\.bias'\], 0 unexpected",
    ):
        copy.load_weights(tmp_path / "wrong.pt")


def test_a_network_must_implement_the_whole_contract() -> None:
    class NoClassifier(SegmentationNetwork):
        output_stride = 8

        def forward(self, images: Tensor, return_features: bool = False) -> Tensor:
            return images

        def upsample_logits(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
            return logits

    class NoStride(_Classifier):
        output_stride = SegmentationNetwork.output_stride  # the abstract property again

    for incomplete, missing in ((NoClassifier, "classifier_parameters"), (NoStride, "output_stride")):
        with pytest.raises(TypeError, match=missing):
            incomplete()
    with pytest.raises(ValueError, match="must be a uda_sam.nn.SegmentationNetwork"):
        load_network_weights(nn.Conv2d(3, 3, 1), "unused.pt")  # type: ignore[arg-type]
