"""The field's DeepLabV2 (caffe style) and its files: every published layout loads and gives the reference's outputs.

The reference below is written here from the published description of the network (not from the package code):
stride on the first 1x1 convolution of a downsampling bottleneck, a ceil-mode stem pool, layer3 / layer4 dilated
2 / 4 in every block, heads ``layer5`` / ``layer6`` summing 3x3 atrous branches (dilation = padding 6, 12, 18, 24).
The numerical checks use the published layout at a small depth (one or two blocks a stage, widths unchanged), added
to the depth table for this module: a ResNet-50 is 2.5 times the bytes to build, save and read. The full ResNet-101
and ResNet-50 layouts are checked key for key on the meta device.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from uda_sam.nn import DeepLabV2, read_state_dict_file
from uda_sam.nn.caffe_resnet import CAFFE_DEPTHS
from uda_sam.nn.sam_io import load_network_weights, load_sam

RESNET50 = (3, 4, 6, 3)
RESNET101 = (3, 4, 23, 3)
TINY = (1, 2, 2, 1)  # first and further blocks in layer2 and in the dilated layer3


class RefBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + residual)


class RefHead(nn.Module):
    def __init__(self, inplanes: int, classes: int, used: int = 4) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, classes, 3, padding=d, dilation=d) for d in (6, 12, 18, 24)
        )
        self.used = used  # AdaptSegNet's classifier returns after its second branch

    def forward(self, x: Tensor) -> Tensor:
        return sum(conv(x) for conv in self.conv2d_list[: self.used])


class RefDeepLab(nn.Module):
    """The published DeepLabV2: single-level (head layer5 on layer4) or multi-level (layer5 on layer3, layer6 on layer4)."""

    def __init__(
        self, depths: tuple[int, ...], classes: int, multi_level: bool = False, used: int = 4
    ) -> None:
        super().__init__()
        self.multi_level = multi_level
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = 64
        for index, (planes, blocks, stride, dilation) in enumerate(
            zip((64, 128, 256, 512), depths, (1, 2, 1, 1), (1, 1, 2, 4), strict=True), start=1
        ):
            layer = [RefBottleneck(inplanes, planes, stride, dilation, project=True)]
            layer += [
                RefBottleneck(planes * 4, planes, 1, dilation, project=False) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            inplanes = planes * 4
        if multi_level:
            self.layer5 = RefHead(1024, classes, used)
            self.layer6 = RefHead(2048, classes, used)
        else:
            self.layer5 = RefHead(2048, classes, used)
        randomize_batchnorm(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(main logits, layer4 features)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        features = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return (self.layer6 if self.multi_level else self.layer5)(features), features


def randomize_batchnorm(module: nn.Module) -> None:
    # Statistics and affine parameters away from the defaults, so a BatchNorm loaded wrongly shows.
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.0)
                bn.bias.uniform_(-0.1, 0.1)


@pytest.fixture(scope="module", autouse=True)
def tiny_depth() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(CAFFE_DEPTHS, "tiny", TINY)
        yield


def caffe(**kwargs: object) -> DeepLabV2:
    return DeepLabV2(backbone="tiny", style="caffe", **kwargs).eval()  # type: ignore[arg-type]


def outputs(network: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return network(x, return_features=True) if isinstance(network, DeepLabV2) else network(x)


def assert_same(actual: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def image() -> Tensor:
    return torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 50  # Caffe-like range


@pytest.fixture(scope="module")
def network() -> DeepLabV2:
    """One caffe-style DeepLabV2 for 19 classes, shared: every test loads the weights it checks."""
    return caffe()


@pytest.fixture(scope="module")
def bdl(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefDeepLab, Path]:
    """A single-level model (BDL / FDA / CRST): a raw state dict, main head layer5 on 2048 channels."""
    torch.manual_seed(1)
    reference = RefDeepLab(TINY, 19).eval()
    path = tmp_path_factory.mktemp("bdl") / "GTA5_deeplab.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.parametrize(("backbone", "depths"), [("resnet101", RESNET101), ("resnet50", RESNET50)])
def test_caffe_resnets_have_the_published_keys_and_geometry(backbone: str, depths: tuple[int, ...]) -> None:
    with torch.device("meta"):
        network = DeepLabV2(backbone=backbone, style="caffe")  # type: ignore[arg-type]
        reference = RefDeepLab(depths, 19)
    own = {
        k.removeprefix("backbone."): v.shape
        for k, v in network.state_dict().items()
        if k.startswith("backbone.")
    }
    published = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("layer5.")}
    assert own == published
    assert list(network.classifier.state_dict()) == [
        f"conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    ]
    resnet = network.backbone
    assert resnet.maxpool.ceil_mode and resnet.maxpool.padding == 1
    assert resnet.layer2[0].conv1.stride == (2, 2) and resnet.layer2[0].conv2.stride == (1, 1)
    for layer, dilation in ((resnet.layer3, 2), (resnet.layer4, 4)):
        assert all(block.conv2.dilation == (dilation, dilation) for block in layer)
        assert all(m.stride == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))
        assert layer[0].downsample is not None and all(block.downsample is None for block in layer[1:])
    assert network.feature_channels == 2048 and network.backbone.name == backbone


def test_caffe_network_keeps_the_network_interface(network: DeepLabV2, image: Tensor) -> None:
    network.train()
    batchnorms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not bn.training and not bn.weight.requires_grad for bn in batchnorms)
    assert network.classifier.training
    groups = network.param_groups(lr=1.0)
    assert [g["name"] for g in groups] == ["backbone", "classifier"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in network.classifier.parameters()}
    network.eval()
    logits, features = outputs(network, image)
    torch.testing.assert_close(network.classifier(features), logits)  # the feature-layer SAM variant's path
    assert logits.shape == (
        1,
        19,
        5,
        9,
    )  # ceil((floor(ceil(32/2)/2) + 1) / 2) = 5 rows, as the published network
    assert network.upsample_logits(logits, (64, 128)).shape == (1, 19, 64, 128)


def test_single_level_file(network: DeepLabV2, bdl: tuple[RefDeepLab, Path], image: Tensor) -> None:
    reference, path = bdl
    network.load_weights(path)
    assert_same(outputs(network, image), outputs(reference, image))


@pytest.mark.parametrize(
    ("prefix", "used"),
    [("", 4), ("module.", 2)],
    ids=["advent-multi-level", "adaptsegnet-dataparallel-two-branches"],
)
def test_multi_level_file(tmp_path: Path, image: Tensor, prefix: str, used: int) -> None:
    torch.manual_seed(2)
    reference = RefDeepLab(TINY, 19, multi_level=True, used=used).eval()
    path = tmp_path / "multi.pth"
    torch.save({prefix + k: v for k, v in reference.state_dict().items()}, path)
    network = caffe(aspp_branches=used)
    network.load_weights(path)  # main head layer6 chosen by its 2048 input channels, layer5 ignored
    assert_same(outputs(network, image), outputs(reference, image))


def test_init_file(bdl: tuple[RefDeepLab, Path], tmp_path: Path, image: Tensor) -> None:
    reference = copy.deepcopy(bdl[0])
    torch.manual_seed(3)
    reference.layer5 = RefHead(2048, 21).eval()  # the init files' head predicts PASCAL's 21 classes
    state = {
        f"Scale.{k}": v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth"
    torch.save(
        state, path, _use_new_zipfile_serialization=False
    )  # the published files predate the zip format
    expected_logits, expected_features = outputs(reference, image)
    network = caffe(pretrained=str(path))
    logits, features = outputs(network, image)
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-5)
    # The 21-class head is dropped: the classifier keeps its N(0, 0.01) initialisation.
    assert (
        logits.shape[1] == 19
        and 0.009 < float(network.classifier.conv2d_list[0].weight.detach().std()) < 0.011
    )
    assert_same(
        outputs(caffe(num_classes=21, pretrained=str(path)), image), (expected_logits, expected_features)
    )


def test_weights_option_own_files_and_teacher(bdl: tuple[RefDeepLab, Path], tmp_path: Path) -> None:
    path = bdl[1]
    # The network option (YAML: model.init_args.network.init_args.weights); pretrained is then not read.
    trained = caffe(weights=str(path), pretrained="imagenet")
    expected = trained.state_dict()
    torch.testing.assert_close(
        expected["backbone.layer3.1.bn3.running_var"], bdl[0].layer3[1].bn3.running_var
    )
    exported, ckpt = tmp_path / "exported.pth", tmp_path / "last.ckpt"
    torch.save(expected, exported)
    lightning = {f"network.{k}": v for k, v in expected.items()}
    lightning["sam.transform.weight"] = torch.zeros(19, 19, 1, 1)
    torch.save({"state_dict": lightning, "global_step": 7, "pytorch-lightning_version": "2.6.0"}, ckpt)
    network = caffe()
    for file in (exported, ckpt):
        nn.init.zeros_(network.classifier.conv2d_list[0].weight)
        network.load_weights(file)
        torch.testing.assert_close(network.state_dict(), expected, rtol=0, atol=0)
    # A published source-only model as generation 1's teacher (PseudoLabelRegeneration, uda-sam pseudo-label).
    for file in (path, ckpt):
        nn.init.zeros_(network.classifier.conv2d_list[0].weight)
        load_network_weights(network, file, "PseudoLabelRegeneration.teacher_checkpoint")
        torch.testing.assert_close(network.state_dict(), expected, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"teacher_checkpoint: .*GTA5_deeplab\.pth.*built with num_classes=5"
    ):
        load_network_weights(caffe(num_classes=5), path, "teacher_checkpoint")


def test_pytorch_style_keeps_its_files_and_refuses_the_published_ones(
    network: DeepLabV2, bdl: tuple[RefDeepLab, Path], tmp_path: Path
) -> None:
    torch.manual_seed(5)
    small = DeepLabV2(num_classes=3, backbone="resnet18").eval()
    exported = tmp_path / "resnet18.pth"
    torch.save(small.state_dict(), exported)
    copy_ = DeepLabV2(num_classes=3, backbone="resnet18", weights=str(exported))
    torch.testing.assert_close(copy_.state_dict(), small.state_dict())
    with pytest.raises(ValueError, match=r"GTA5_deeplab\.pth.*style='caffe'"):
        small.load_weights(bdl[1])
    with pytest.raises(ValueError, match=r"resnet18\.pth.*saved from a DeepLabV2\(style='pytorch'\)"):
        network.load_weights(exported)
    torchvision_file = tmp_path / "resnet18-torchvision.pth"
    torch.save(models.resnet18().state_dict(), torchvision_file)
    with pytest.raises(ValueError, match=r"resnet18-torchvision\.pth.*torchvision ResNet file"):
        small.load_weights(torchvision_file)
    with pytest.raises(
        ValueError, match=r"resnet18-torchvision\.pth.*not a DeepLabV2's: 2 \[fc\.bias, fc\.weight\]"
    ):
        network.load_weights(torchvision_file)
    with pytest.raises(ValueError, match=r"GTA5_deeplab\.pth.*need DeepLabV2\(style='caffe'\)"):
        DeepLabV2(backbone="resnet18", pretrained=str(bdl[1]))
    with pytest.raises(ValueError, match="no download"):
        caffe(pretrained="imagenet")
    with pytest.raises(ValueError, match="resnet101.*resnet50"):
        DeepLabV2(backbone="resnet18", style="caffe")
    with pytest.raises(ValueError, match="aspp_branches"):
        DeepLabV2(backbone="resnet18", aspp_branches=5)


def test_bad_files(network: DeepLabV2, bdl: tuple[RefDeepLab, Path], tmp_path: Path) -> None:
    reference, path = bdl
    state = reference.state_dict()
    with torch.device("meta"):
        deeper = DeepLabV2(style="caffe")  # ResNet-101: the file lacks 21 blocks of layer3 and 2 of layer4
    with pytest.raises(
        ValueError,
        match=r"GTA5_deeplab\.pth.*\(backbone\).*missing keys 405 \[layer1\.1\.bn1\.bias, .*, \.\.\.\]; expected",
    ):
        deeper.load_weights(path)

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer2.1.conv")}, missing)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"missing\.pth.*missing keys 3 \[layer2\.1\.conv1\.weight, layer2\.1\.conv2"
    ):
        network.load_weights(missing)
    torch.testing.assert_close(network.state_dict(), before, rtol=0, atol=0)  # nothing half-loaded

    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer7.weight": torch.zeros(1)}, extra)
    with pytest.raises(
        ValueError, match=r"extra\.pth' has keys that are not a DeepLabV2's: 1 \[layer7\.weight\]"
    ):
        network.load_weights(extra)

    with pytest.raises(ValueError, match=r"GTA5_deeplab\.pth.*predicts 19 classes.*num_classes=7"):
        caffe(num_classes=7, weights=str(path))

    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer5.")}, headless)
    with pytest.raises(
        ValueError, match=r"headless\.pth' has no classifier head on the backbone's 2048 output"
    ):
        network.load_weights(headless)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth.*truncated"):
        network.load_weights(truncated)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        network.load_weights(tmp_path / "nowhere.pth")


class _RunsCode:
    """A pickle that would run a shell command when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_in_a_pickle_is_refused_never_run(network: DeepLabV2, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _RunsCode(marker)}
    if writer == "pickle":  # a plain pickle, of the protocol torch.save uses
        evil.write_bytes(pickle.dumps({"payload": payload["payload"]}, protocol=2))
    else:
        torch.save(payload, evil)
    readers = [
        lambda: network.load_weights(evil),
        lambda: read_state_dict_file(evil),
        lambda: DeepLabV2(backbone="resnet18", pretrained=str(evil)),
        lambda: load_sam(evil),
        lambda: load_network_weights(network, evil, "teacher_checkpoint"),
    ]
    for read in readers:
        with pytest.raises(ValueError, match="not a weights-only checkpoint") as error:
            read()
        assert "evil.pth" in str(error.value) and "posix.system" in str(error.value)
        assert "weights_only=False" not in str(error.value) and "weights_only` set to `False" not in str(
            error.value
        )
    assert not marker.exists()
