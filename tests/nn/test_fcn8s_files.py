"""The FCN-8s "at once" of BDL and FDA (``FCN8s(style="caffe")``) and its files: outputs equal to the reference's.

The reference below is written here from the published description of the network (wkentaro's ``FCN8sAtOnce``
layout, which BDL and FDA ship), not from the package code: conv1_1 padded by 100, ceil-mode pools, fc6 a 7x7
convolution without padding, pool4 / pool3 scaled by 0.01 / 0.0001 before their score layers, crops at offsets 5
(pool4), 9 (pool3) and 31 (the final x8 transposed convolution). Its weights are random, the upsampling ones too, so
that a file's transposed convolutions are shown to be read; the skip score layers are scaled up by the inverse of
their input scales, so that each of the three paths weighs on the output as much as the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from uda_sam.nn import FCN8s, load_fcn8s_state_dict
from uda_sam.nn.fcn8s import caffe_cells
from uda_sam.nn.sam_io import load_network_weights

CLASSES = 3
BLOCKS = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)
SIZES = [(32, 64), (37, 50), (9, 17)]


class RefFCN8sAtOnce(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        in_channels = 3
        for block, (count, width) in enumerate(zip(BLOCKS, WIDTHS, strict=True), start=1):
            for i in range(1, count + 1):
                padding = 100 if (block, i) == (1, 1) else 1
                setattr(self, f"conv{block}_{i}", nn.Conv2d(in_channels, width, 3, padding=padding))
                in_channels = width
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop6, self.drop7 = nn.Dropout2d(), nn.Dropout2d()
        self.score_fr = nn.Conv2d(4096, classes, 1)
        self.score_pool3 = nn.Conv2d(256, classes, 1)
        self.score_pool4 = nn.Conv2d(512, classes, 1)
        self.upscore2 = nn.ConvTranspose2d(classes, classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(classes, classes, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(classes, classes, 4, stride=2, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The full-resolution scores, and the fused stride-8 map before the final upsampling."""
        h, pools = x, []
        for block, count in enumerate(BLOCKS, start=1):
            for i in range(1, count + 1):
                h = F.relu(getattr(self, f"conv{block}_{i}")(h))
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4, pool5 = pools[2:]
        h = self.drop7(F.relu(self.fc7(self.drop6(F.relu(self.fc6(pool5))))))
        upscore2 = self.upscore2(self.score_fr(h))
        h = self.score_pool4(pool4 * 0.01)[:, :, 5 : 5 + upscore2.size(2), 5 : 5 + upscore2.size(3)]
        upscore_pool4 = self.upscore_pool4(upscore2 + h)
        h = self.score_pool3(pool3 * 0.0001)
        h = h[:, :, 9 : 9 + upscore_pool4.size(2), 9 : 9 + upscore_pool4.size(3)]
        fused = upscore_pool4 + h
        out = self.upscore8(fused)[:, :, 31 : 31 + x.size(2), 31 : 31 + x.size(3)]
        return out, fused


def random_reference(classes: int, seed: int = 0) -> RefFCN8sAtOnce:
    torch.manual_seed(seed)
    reference = RefFCN8sAtOnce(classes)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # activations stay of order 1
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.1)
        reference.score_pool4.weight.mul_(100)
        reference.score_pool3.weight.mul_(10000)
    return reference.eval()


def random_state(classes: int) -> dict[str, Tensor]:
    """A state dict of the published layout with random values (cheaper than initialising a network)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RefFCN8sAtOnce(classes).state_dict().items()}
    return {k: torch.randn(shape) for k, shape in shapes.items()}


def meta_fcn8s(**kwargs: object) -> FCN8s:
    """A network without memory, for checks that fail before anything is loaded."""
    with torch.device("meta"):
        return FCN8s(num_classes=CLASSES, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference() -> RefFCN8sAtOnce:
    return random_reference(CLASSES)


@pytest.fixture(scope="module")
def reference_file(reference: RefFCN8sAtOnce, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fcn8s") / "GTA5_VGG.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def loaded(reference_file: Path) -> FCN8s:
    return FCN8s(num_classes=CLASSES, style="caffe", weights=str(reference_file)).eval()


def assert_same_state(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def assert_equal_outputs(actual: Tensor, expected: Tensor) -> None:
    assert expected.abs().amax() > 0.1  # not a vanishing output that anything would match
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_keys_are_the_published_layout(reference: RefFCN8sAtOnce) -> None:
    with torch.device("meta"):
        network = FCN8s(num_classes=CLASSES, style="caffe")
    ours = {k: v.shape for k, v in network.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("size", SIZES)
def test_outputs_equal_the_reference(loaded: FCN8s, reference: RefFCN8sAtOnce, size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, fused = reference(image)
        logits = loaded(image)
        output = loaded.upsample_logits(logits, size)
    # P is the fused stride-8 map over the cells the final upsampling reads for the image: the padding's are cut.
    rows, cols = caffe_cells(size[0]), caffe_cells(size[1])
    assert logits.shape == (2, CLASSES, rows, cols)
    assert rows == (size[0] + 30) // 8 - 1
    assert_equal_outputs(logits, fused[..., 2 : 2 + rows, 2 : 2 + cols])
    assert output.shape == expected.shape
    assert_equal_outputs(output, expected)


def test_every_size_that_gives_the_same_map_is_cropped_exactly(
    loaded: FCN8s, reference: RefFCN8sAtOnce
) -> None:
    # Heights 26..33 all give 6 rows of P: upsample_logits cannot know which one the image had, and need not
    # (the first, a middle and the last one checked).
    image = torch.randn(1, 3, 33, 24)
    with torch.no_grad():
        for height in (26, 30, 33):
            crop = image[..., :height, :]
            expected, _ = reference(crop)
            logits = loaded(crop)
            assert logits.shape[-2] == 6
            assert_equal_outputs(loaded.upsample_logits(logits, (height, 24)), expected)


def test_other_sizes_interpolate_the_largest_matching_map(loaded: FCN8s) -> None:
    image = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        logits = loaded(image)
        largest = loaded.upsample_logits(logits, (8 * logits.shape[-2] - 15, 8 * logits.shape[-1] - 15))
        doubled = loaded.upsample_logits(logits, (64, 128))
    expected = F.interpolate(largest, size=(64, 128), mode="bilinear", align_corners=True)
    torch.testing.assert_close(doubled, expected)


def test_export_loads_into_the_published_code(loaded: FCN8s, reference: RefFCN8sAtOnce) -> None:
    again = RefFCN8sAtOnce(CLASSES)
    again.load_state_dict(loaded.state_dict(), strict=True)
    assert_same_state(again.state_dict(), reference.state_dict())


def test_data_parallel_and_lightning_files(loaded: FCN8s, reference: RefFCN8sAtOnce, tmp_path: Path) -> None:
    state = reference.state_dict()
    network = FCN8s(num_classes=CLASSES, style="caffe")

    def load_into_zeroed(load: Callable[..., None]) -> None:
        with torch.no_grad():
            for value in network.state_dict().values():
                value.zero_()
        load()
        assert_same_state(network.state_dict(), loaded.state_dict())

    for wrapped in (
        {f"module.{k}": v for k, v in state.items()},  # saved from DataParallel
        {f"network.{k}": v for k, v in state.items()}
        | {"sam.conv.weight": torch.zeros(1)},  # a task's state dict
    ):
        load_into_zeroed(lambda state=wrapped: load_fcn8s_state_dict(network, state, "test file"))
    # A uda-sam Lightning checkpoint as a teacher (PseudoLabelRegeneration.teacher_checkpoint, pseudo-label).
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in state.items()}, "global_step": 3}, checkpoint)
    load_into_zeroed(lambda: load_network_weights(network, checkpoint, option="teacher_checkpoint"))


def test_published_file_as_teacher(loaded: FCN8s, reference_file: Path) -> None:
    teacher = FCN8s(num_classes=CLASSES, style="caffe")
    load_network_weights(teacher, reference_file, option="teacher_checkpoint")
    assert_same_state(teacher.state_dict(), loaded.state_dict())


def test_init_from_a_model_for_other_classes() -> None:
    # An FCN-8s of the model zoo (PASCAL's 21 classes) as pretrained: trunk read, heads of our class count kept.
    pascal = random_state(21)
    network = FCN8s(num_classes=CLASSES, style="caffe")
    heads_before = {
        k: v.clone() for k, v in network.state_dict().items() if k.split(".")[0].startswith(("score", "up"))
    }
    load_fcn8s_state_dict(network, pascal, "pretrained file", init=True)
    ours = network.state_dict()
    assert_same_state(ours, {k: heads_before.get(k, v) for k, v in pascal.items()})
    with pytest.raises(ValueError, match=r"score_fr predicts 21 classes.*num_classes=3"):
        load_fcn8s_state_dict(meta_fcn8s(style="caffe"), pascal, "weights file 'zoo.pth'")


def test_init_from_torchvision_vgg16_in_either_style() -> None:
    torch.manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in models.vgg16().state_dict().items()}
    vgg = {k: torch.randn(shape) for k, shape in shapes.items()}
    for style in ("caffe", "pytorch"):
        network = FCN8s(num_classes=CLASSES, style=style)
        load_fcn8s_state_dict(network, vgg, "pretrained file", init=True)
        conv3_2 = network.conv3_2 if style == "caffe" else network.features[12]
        assert torch.equal(conv3_2.weight, vgg["features.12.weight"])
        assert torch.equal(network.fc6.weight, vgg["classifier.0.weight"].reshape(4096, 512, 7, 7))
        assert network.score_fr.weight.abs().sum() == 0  # the ImageNet classifier is not a score layer
    with pytest.raises(ValueError, match="pass it as pretrained"):
        load_fcn8s_state_dict(meta_fcn8s(style="caffe"), vgg, "weights file 'vgg16.pth'")


def test_caffe_style_trains_what_the_published_trainers_train() -> None:
    network = FCN8s(num_classes=CLASSES, style="caffe")
    groups = network.param_groups(lr=1e-5, classifier_lr_mult=1.0)
    listed = {id(p) for g in groups for p in g["params"]}
    fixed = {id(m.weight) for m in (network.upscore2, network.upscore_pool4, network.upscore8)}
    assert listed == {id(p) for p in network.parameters()} - fixed
    assert not any(p.requires_grad for m in (network.upscore2, network.upscore8) for p in m.parameters())
    # Fixed at bilinear upsampling: a constant map stays constant inside the image.
    with torch.no_grad():
        up = network.upsample_logits(torch.ones(1, CLASSES, 6, 10), (32, 64))
    torch.testing.assert_close(up[..., 4:-4, 4:-4], torch.ones_like(up[..., 4:-4, 4:-4]))


def test_files_of_the_other_style_are_refused(reference: RefFCN8sAtOnce) -> None:
    with pytest.raises(ValueError, match=r"at-once layout.*style='pytorch'.*build FCN8s\(style='caffe'\)"):
        load_fcn8s_state_dict(meta_fcn8s(), reference.state_dict(), "weights file 'GTA5_VGG.pth'")
    pytorch_style = meta_fcn8s().state_dict()
    with pytest.raises(ValueError, match=r"FCN8s\(style='pytorch'\).*build FCN8s\(style='pytorch'\)"):
        load_fcn8s_state_dict(meta_fcn8s(style="caffe"), pytorch_style, "weights file 'ours.pth'")


def test_bad_files_name_the_file_and_the_keys(reference: RefFCN8sAtOnce, tmp_path: Path) -> None:
    network = FCN8s(num_classes=CLASSES, style="caffe")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    partial = {k: v for k, v in reference.state_dict().items() if not k.startswith("conv3_2.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_fcn8s_state_dict(network, partial, "weights file 'partial.pth'")
    message = str(error.value)
    assert "weights file 'partial.pth'" in message and "at-once layout" in message
    assert "missing keys 2 [conv3_2.bias, conv3_2.weight]" in message
    assert "unexpected keys 1 [extra.weight]" in message
    assert_same_state(network.state_dict(), before)  # nothing half-loaded
    deeplab = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "layer5.conv2d_list.0.weight": torch.zeros(3, 2048, 3, 3),
    }
    with pytest.raises(
        ValueError, match=r"'deeplab.pth' is not an FCN-8s file: its keys are 2 \[conv1.weight"
    ):
        load_fcn8s_state_dict(network, deeplab, "weights file 'deeplab.pth'")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ValueError, match="truncated.pth.*truncated, corrupt"):
        network.load_weights(truncated)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FCN8s(num_classes=CLASSES, style="caffe", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"reaches it as the string 'None'.*pretrained: null"):
        FCN8s(
            num_classes=CLASSES, style="caffe", pretrained="None"
        )  # `--...pretrained null` on the command line
    with pytest.raises(ValueError, match="style must be one of"):
        FCN8s(style="mmseg")  # type: ignore[arg-type]
