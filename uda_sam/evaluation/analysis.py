"""Analyses of the paper as plain functions: entropy of right/wrong pixels (Fig. 4), attention maps (Fig. 3) and
pixel-wise similarity of logits vs ground truth (Fig. E.4).

Everything here is plain torch + numpy and returns tensors or arrays a user can plot (e.g. with matplotlib's
``imshow``); :mod:`uda_sam.callbacks.entropy` and :mod:`uda_sam.callbacks.attention` run them during training.

- Eq. (12): per-pixel entropy ``H_i = -sum_c p_ic log p_ic`` (natural log, nats); an image's pixels are split into
  correctly (``argmax_c p_ic == label_i``) and incorrectly classified ones (ignore label 255 excluded), each group is
  averaged, and the per-image means are averaged over images (:class:`EntropyAnalysis`).
- Fig. 3: for a class, the pixel with the highest confidence for it and the map ``relu(cos(P_i, P_j))`` over all
  pixels ``j``, for the network's logits ``P`` and for ``P~ = P + SAM(P)``.
- Eq. (13), Fig. E.4: ``relu(cos(P_i, P_j))`` for all pixel pairs, next to the same for one-hot ground-truth rows
  (labels resized by nearest neighbour to the logit size ``h x w``).
- Attention quality (the method's premise, that SAM attends to pixels of the same class): the mean entropy of the
  attention rows against uniform attention, and the share of a row's attention mass on pixels of the row's own
  ground-truth class against the chance level, the share of such pixels (:class:`AttentionQuality`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda_sam.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from uda_sam.data.transforms import denormalize as _denormalize_chw
from uda_sam.nn.sam import relu_cosine_similarity

__all__ = [
    "AttentionQuality",
    "EntropyAnalysis",
    "attention_maps",
    "attention_maps_from_logits",
    "denormalize",
    "entropy_by_correctness",
    "eval_mode",
    "jet_colormap",
    "label_similarity",
    "logits_and_refined",
    "measure_attention_quality",
    "most_confident_pixel",
    "overlay",
    "pixel_entropy",
    "pixel_similarity",
    "pool_to_max_pixels",
    "resolve_classes",
    "similarity_map",
    "similarity_matrices",
]


# ------------------------------------------------------------------------------------------------ entropy (eq. 12)
def pixel_entropy(probs: Tensor, dim: int = 1) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` (nats) along ``dim``, with ``0 log 0 = 0``; computed in float32 or wider.

    Args:
        probs: Probabilities, e.g. ``(B, C, H, W)``.
        dim: The class axis.

    Returns:
        ``probs`` without ``dim``.
    """
    return torch.special.entr(probs.to(torch.promote_types(probs.dtype, torch.float32))).sum(dim=dim)


def _check_probs_labels(probs: Tensor, labels: Tensor) -> None:
    if probs.dim() != 4:
        raise ValueError(
            f"probs must be a (B, C, H, W) tensor of probabilities; got shape {tuple(probs.shape)}"
        )
    if labels.dim() != 3 or labels.shape[0] != probs.shape[0] or labels.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"labels must be a (B, H, W) tensor matching probs {tuple(probs.shape)}; got shape {tuple(labels.shape)}"
        )


def entropy_by_correctness(
    probs: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per image, the mean entropy of its correctly and of its incorrectly classified pixels (eq. 12).

    Args:
        probs: Softmax probabilities ``(B, C, H, W)`` (upsample the logits to the label size first).
        labels: Ground truth ``(B, H, W)`` trainIds; pixels equal to ``ignore_index`` are left out.
        ignore_index: The ignore label.

    Returns:
        ``(correct, incorrect)``, two float tensors of shape ``(B,)``; an image without such pixels gets NaN.

    Raises:
        ValueError: On shapes other than ``(B, C, H, W)`` / ``(B, H, W)``.
    """
    _check_probs_labels(probs, labels)
    entropy = pixel_entropy(probs, dim=1).flatten(1)  # (B, HW)
    labels = labels.to(probs.device).flatten(1)
    valid = labels != ignore_index
    correct = (probs.argmax(dim=1).flatten(1) == labels) & valid
    incorrect = valid & ~correct

    def group_mean(mask: Tensor) -> Tensor:
        count = mask.sum(dim=1)
        total = torch.where(mask, entropy, torch.zeros_like(entropy)).sum(dim=1)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))

    return group_mean(correct), group_mean(incorrect)


class EntropyAnalysis:
    """Average of per-image mean entropies of correct and incorrect pixels over images, NaN-skipping (Fig. 4).

    The state is three float64 tensors that add up across processes: ``sums`` (2,) of the per-image means
    (correct, incorrect), ``counts`` (2,) of the images that contributed to each, and ``num_images`` (scalar).
    :meth:`state_tensor` packs them into one (5,) tensor for a single ``all_reduce(sum)``;
    :meth:`load_state_tensor` unpacks the result.

    Args:
        ignore_index: The ignore label of the masks.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Zero the state."""
        self.sums = torch.zeros(2, dtype=torch.float64)
        self.counts = torch.zeros(2, dtype=torch.float64)
        self.num_images = torch.zeros((), dtype=torch.float64)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch of images (see :func:`entropy_by_correctness` for the arguments)."""
        correct, incorrect = entropy_by_correctness(probs, labels, self.ignore_index)
        self.update_means(correct, incorrect)

    def update_means(self, correct: Tensor, incorrect: Tensor) -> None:
        """Add per-image means ``(B,)`` directly (NaN entries are skipped for that group only)."""
        for group, values in enumerate((correct, incorrect)):
            values = values.detach().to("cpu", torch.float64).flatten()
            finite = ~torch.isnan(values)
            self.sums[group] += values[finite].sum()
            self.counts[group] += finite.sum()
        self.num_images += correct.numel()

    def compute(self) -> dict[str, float]:
        """``{"entropy_correct", "entropy_incorrect", "num_images"}``; a mean over no image is NaN."""
        means = torch.where(
            self.counts > 0, self.sums / self.counts.clamp_min(1), torch.full_like(self.sums, math.nan)
        )
        return {
            "entropy_correct": float(means[0]),
            "entropy_incorrect": float(means[1]),
            "num_images": int(self.num_images.item()),
        }

    def state_tensor(self) -> Tensor:
        """The state as one float64 tensor ``[sum_correct, sum_incorrect, count_correct, count_incorrect, images]``."""
        return torch.cat([self.sums, self.counts, self.num_images.reshape(1)])

    def load_state_tensor(self, state: Tensor) -> None:
        """Replace the state with a tensor from :meth:`state_tensor` (e.g. after summing it across processes)."""
        state = state.detach().to("cpu", torch.float64).flatten()
        if state.numel() != 5:
            raise ValueError(f"state must have 5 entries as made by state_tensor(); got {state.numel()}")
        self.sums, self.counts, self.num_images = state[:2].clone(), state[2:4].clone(), state[4].clone()

    def merge(self, other: EntropyAnalysis) -> EntropyAnalysis:
        """Add ``other``'s state to this one (in place) and return ``self``."""
        self.load_state_tensor(self.state_tensor() + other.state_tensor())
        return self

    def __add__(self, other: EntropyAnalysis) -> EntropyAnalysis:
        result = EntropyAnalysis(self.ignore_index)
        result.load_state_tensor(self.state_tensor() + other.state_tensor())
        return result


# ------------------------------------------------------------------------------------------- attention (Fig. 3)
def _chw(tensor: Tensor, name: str) -> Tensor:
    """Accept ``(C, h, w)`` or ``(1, C, h, w)``."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3:
        raise ValueError(
            f"{name} must be a (C, h, w) or (1, C, h, w) tensor; got shape {tuple(tensor.shape)}"
        )
    return tensor


def _looks_like_probs(values: Tensor) -> bool:
    if values.min() < 0 or values.max() > 1:
        return False
    return bool(torch.allclose(values.sum(dim=0), torch.ones_like(values[0]), atol=1e-3))


def most_confident_pixel(
    probs_or_logits: Tensor, class_index: int, is_probs: bool | None = None
) -> tuple[int, int] | None:
    """The pixel predicted as ``class_index`` with the highest probability for it.

    Only pixels whose argmax is the class count, so the chosen pixel really "is" that class for the network.

    Args:
        probs_or_logits: ``(C, h, w)`` or ``(1, C, h, w)`` probabilities or logits.
        class_index: The class (trainId).
        is_probs: Whether the input holds probabilities; ``None`` detects it (non-negative, channels sum to 1).
            Logits are softmaxed over the class axis.

    Returns:
        ``(row, col)``, or ``None`` when no pixel is predicted as the class.

    Raises:
        ValueError: On a bad shape or a class index outside ``[0, C)``.
    """
    values = _chw(probs_or_logits, "probs_or_logits").detach().float()
    if not 0 <= class_index < values.shape[0]:
        raise ValueError(f"class_index must be in [0, {values.shape[0]}); got {class_index}")
    if is_probs is None:
        is_probs = _looks_like_probs(values)
    probs = values if is_probs else values.softmax(dim=0)
    predicted = probs.argmax(dim=0) == class_index
    if not bool(predicted.any()):
        return None
    confidence = torch.where(predicted, probs[class_index], torch.full_like(probs[class_index], -1.0))
    flat = int(confidence.flatten().argmax())
    return divmod(flat, probs.shape[-1])


def similarity_map(logits: Tensor, pixel: tuple[int, int]) -> Tensor:
    """``relu(cos(P_pixel, P_j))`` for every pixel ``j``: one row of eq. (13) as a map (Fig. 3).

    Args:
        logits: ``(C, h, w)`` or ``(1, C, h, w)``.
        pixel: ``(row, col)`` of the reference pixel.

    Returns:
        ``(h, w)`` float tensor in ``[0, 1]`` (1 at ``pixel`` unless its logit row is zero).

    Raises:
        ValueError: On a bad shape or a pixel outside the map.
    """
    logits = _chw(logits, "logits").detach()
    channels, height, width = logits.shape
    row, col = int(pixel[0]), int(pixel[1])
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(
            f"pixel must be (row, col) inside the {height}x{width} logit map; got {tuple(pixel)}"
        )
    rows = logits.reshape(channels, -1).t()  # (N, C)
    return relu_cosine_similarity(rows[row * width + col].unsqueeze(0), rows)[0].reshape(height, width)


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode and restore every submodule's own ``training`` flag afterwards.

    Restoring flags one by one (rather than calling ``.train()``) keeps e.g. frozen BatchNorm layers in eval mode.
    """
    saved = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        for module in modules:
            if module is not None:
                module.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


def resolve_classes(classes: Sequence[str | int]) -> list[int]:
    """Class names (of ``CLASS_NAMES``) or trainIds -> trainIds.

    Raises:
        ValueError: On an unknown name or an index outside ``[0, 19)``.
    """
    indices = []
    for cls in classes:
        if isinstance(cls, str):
            if cls not in CLASS_NAMES:
                raise ValueError(f"classes: unknown class name {cls!r}; expected one of {list(CLASS_NAMES)}")
            indices.append(CLASS_NAMES.index(cls))
        elif isinstance(cls, int) and 0 <= cls < NUM_CLASSES:
            indices.append(int(cls))
        else:
            raise ValueError(f"classes: expected class names or trainIds in [0, {NUM_CLASSES}); got {cls!r}")
    return indices


def _image_batch(image: Tensor, network: nn.Module) -> Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(
            f"image must be a normalised (3, H, W) or (1, 3, H, W) tensor; got shape {tuple(image.shape)}"
        )
    param = next(network.parameters(), None)
    if param is not None:
        image = image.to(param.device, param.dtype if param.is_floating_point() else image.dtype)
    return image


def logits_and_refined(
    network: nn.Module, image: Tensor, sam: nn.Module | None = None, skip_connection: bool = True
) -> tuple[Tensor, Tensor | None]:
    """One pass of ``network`` (and ``sam``) over one image: the logits ``P`` and ``P~``, each ``(C, h, w)`` float32.

    Runs in eval mode without gradients (the modules' modes are restored). ``P~ = P + SAM(P)`` (or ``SAM(P)`` with
    ``skip_connection=False``); it is ``None`` without ``sam``.

    Raises:
        ValueError: On a bad image shape or a ``sam`` built for another channel count.
    """
    batch = _image_batch(image, network)
    with eval_mode(network, sam), torch.no_grad():
        logits = network(batch)
        refined = None
        if sam is not None:
            sam_channels = getattr(sam, "num_classes", logits.shape[1])
            if sam_channels != logits.shape[1]:
                raise ValueError(
                    f"sam works on {sam_channels} channels but the logits have {logits.shape[1]}; "
                    "attention maps need a SAM over the prediction layer"
                )
            attended = sam(logits)
            refined = (logits + attended if skip_connection else attended)[0].float()
    return logits[0].float(), refined


def attention_maps_from_logits(
    logits: Tensor, classes: Sequence[str | int], refined: Tensor | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`attention_maps` for logits already computed (:func:`logits_and_refined`): no network pass.

    Args:
        logits: ``P``, ``(C, h, w)``.
        classes: Class names (``CLASS_NAMES``) or trainIds.
        refined: ``P~`` of the same shape, or ``None``.
    """
    result: dict[str, dict[str, Any]] = {}
    for index in resolve_classes(classes):
        pixel = most_confident_pixel(logits, index, is_probs=False)
        entry: dict[str, Any] = {"pixel": pixel, "logits": None, "after_sam": None}
        if pixel is not None:
            entry["logits"] = similarity_map(logits, pixel).cpu().numpy()
            if refined is not None:
                entry["after_sam"] = similarity_map(refined, pixel).cpu().numpy()
        result[CLASS_NAMES[index]] = entry
    return result


def attention_maps(
    network: nn.Module,
    image: Tensor,
    classes: Sequence[str | int],
    sam: nn.Module | None = None,
    skip_connection: bool = True,
) -> dict[str, dict[str, Any]]:
    """Fig. 3: per class, the most confident pixel and its similarity map for ``P`` and for ``P~``.

    Runs ``network`` (and ``sam``) once, in eval mode without gradients (their modes are restored). The pixel is
    chosen on ``P`` (:func:`most_confident_pixel`) and the same pixel is used for ``P~ = P + SAM(P)`` (or
    ``SAM(P)`` with ``skip_connection=False``), so both maps show how the same location relates to the rest of the
    image.

    Args:
        network: Segmentation network whose ``forward`` returns pre-upsample logits ``(1, C, h, w)``.
        image: One normalised image ``(3, H, W)`` or ``(1, 3, H, W)``.
        classes: Class names (``CLASS_NAMES``) or trainIds.
        sam: A :class:`~uda_sam.nn.SelfAttentionModule` over the logits, or ``None`` for ``P`` only.
        skip_connection: ``P~ = P + SAM(P)`` when True, ``SAM(P)`` otherwise.

    Returns:
        ``{class_name: {"pixel": (row, col) | None, "logits": (h, w) float32 array | None,
        "after_sam": (h, w) float32 array | None}}``, maps in ``[0, 1]``; a class predicted nowhere gets ``None``
        everywhere, ``after_sam`` is ``None`` without ``sam``.

    Raises:
        ValueError: On a bad image shape, an unknown class, or a ``sam`` built for another channel count.
    """
    resolve_classes(classes)  # an unknown class fails before the network runs
    logits, refined = logits_and_refined(network, image, sam, skip_connection)
    return attention_maps_from_logits(logits, classes, refined)


# ------------------------------------------------------------------------------ pixel similarity (eq. 13, Fig. E.4)
def pixel_similarity(logits: Tensor) -> Tensor:
    """``relu(cos(P_i, P_j))`` for every pair of pixels (eq. 13), row-major pixel order.

    Args:
        logits: ``(C, h, w)`` or ``(1, C, h, w)``.

    Returns:
        ``(N, N)`` float tensor in ``[0, 1]``, ``N = h * w``.
    """
    logits = _chw(logits, "logits").detach()
    rows = logits.reshape(logits.shape[0], -1).t()
    return relu_cosine_similarity(rows, rows)


def _resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    if labels.dim() == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.dim() != 2:
        raise ValueError(f"labels must be an (H, W) tensor of trainIds; got shape {tuple(labels.shape)}")
    if tuple(labels.shape) == tuple(size):
        return labels.long()
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def label_similarity(
    labels: Tensor,
    size: tuple[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Eq. (13) for the ground truth: ``relu(cos)`` of one-hot label rows, i.e. 1 for same-class pairs, else 0.

    Args:
        labels: ``(H, W)`` (or ``(1, H, W)``) trainIds with ``ignore_index``.
        size: ``(h, w)`` of the logits; labels are resized by nearest neighbour. ``None`` keeps ``(H, W)``.
        num_classes: Length of the one-hot rows.
        ignore_index: Pixels with this label get a zero row (similarity 0 with everything, themselves included).

    Returns:
        ``(N, N)`` float32 tensor of zeros and ones, ``N = h * w`` in row-major order.

    Raises:
        ValueError: On a bad shape or labels outside ``[0, num_classes)`` other than ``ignore_index``.
    """
    labels = _resize_labels(labels, tuple(size) if size is not None else tuple(labels.shape[-2:])).flatten()
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        raise ValueError(f"labels must be trainIds in [0, {num_classes}) or {ignore_index}")
    onehot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), num_classes).float()
    onehot = onehot * valid.unsqueeze(1)
    return relu_cosine_similarity(onehot, onehot)


def pool_to_max_pixels(logits: Tensor, max_pixels: int = 1024) -> Tensor:
    """Average-pool ``(C, h, w)`` logits to the largest grid ``ceil(h/s) x ceil(w/s)`` with at most ``max_pixels``.

    Returns the logits unchanged when ``h * w <= max_pixels``; keeps the aspect ratio otherwise.
    """
    logits = _chw(logits, "logits")
    height, width = logits.shape[-2:]
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer; got {max_pixels}")
    stride = 1
    while math.ceil(height / stride) * math.ceil(width / stride) > max_pixels:
        stride += 1
    if stride == 1:
        return logits
    size = (math.ceil(height / stride), math.ceil(width / stride))
    return F.adaptive_avg_pool2d(logits.unsqueeze(0).float(), size)[0]


def similarity_matrices(
    logits: Tensor,
    labels: Tensor,
    max_pixels: int = 1024,
    sort_by_label: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Fig. E.4: the pixel-wise similarity of the logits next to that of the one-hot ground truth.

    Logits with more than ``max_pixels`` pixels are average-pooled first (:func:`pool_to_max_pixels`) so the
    ``N x N`` matrices stay small; the labels are resized (nearest) to the same grid.

    Args:
        logits: ``(C, h, w)`` or ``(1, C, h, w)``.
        labels: ``(H, W)`` trainIds with ``ignore_index``.
        max_pixels: Upper bound on ``N``.
        sort_by_label: Reorder pixels by ground-truth class (ignored pixels last, row-major within a class), so the
            ground truth is block-diagonal and both matrices are read the same way; ``False`` keeps row-major order.
        ignore_index: The ignore label.

    Returns:
        ``{"logits": (N, N) tensor, "labels": (N, N) tensor, "size": (h', w'), "order": (N,) pixel indices}``.
    """
    pooled = pool_to_max_pixels(logits.detach(), max_pixels)
    size = (int(pooled.shape[-2]), int(pooled.shape[-1]))
    grid_labels = _resize_labels(labels.to(pooled.device), size).flatten()
    if sort_by_label:
        keys = torch.where(grid_labels == ignore_index, torch.full_like(grid_labels, 1 << 20), grid_labels)
        order = torch.sort(keys, stable=True).indices
    else:
        order = torch.arange(grid_labels.numel(), device=grid_labels.device)
    logit_sim = pixel_similarity(pooled)[order][:, order]
    label_sim = label_similarity(
        grid_labels.reshape(size), num_classes=pooled.shape[0], ignore_index=ignore_index
    )
    return {"logits": logit_sim, "labels": label_sim[order][:, order], "size": size, "order": order}


# ------------------------------------------------------------------------------------------ attention quality
class AttentionQuality:
    """Does an attention attend to pixels of the same class? Running sums over images, exact in row blocks.

    For every attention row ``i`` whose (nearest-resized) ground-truth label ``y_i`` is not ignored:

    - ``entropy``: ``-sum_j Â_ij log Â_ij`` (nats), against ``uniform_entropy = log N`` (attention spread evenly);
    - ``same_class_share``: ``sum_{j: y_j = y_i} Â_ij``, the attention mass on the row's own class, against
      ``chance_share``: ``#{j: y_j = y_i} / N``, what an attention blind to the content would put there.

    :meth:`compute` averages each over all rows seen. A SAM that learnt inter-pixel correlations has an entropy
    clearly below uniform and a same-class share clearly above chance; ``lift`` is their ratio.

    Args:
        num_classes: Classes of the labels.
        ignore_index: Rows of pixels with this label are skipped (as columns they count as another class).
        block_size: Attention rows computed at a time (memory ``O(block_size * N)``).
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, block_size: int = 1024
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.block_size = block_size
        self.sums = torch.zeros(4, dtype=torch.float64)  # entropy, log N, same-class share, chance share
        self.rows = 0
        self.images = 0

    def update(self, query: Tensor, labels: Tensor) -> None:
        """Add a batch: ``query`` are the SAM's ``Q = Conv(P)`` maps ``(B, C', h, w)`` (the attention is
        ``rownorm(relu(cos(Q_i, Q_j)))``), ``labels`` ``(B, H, W)`` trainIds, resized here to ``h x w``."""
        if query.dim() != 4 or labels.dim() != 3 or labels.shape[0] != query.shape[0]:
            raise ValueError(
                f"query must be (B, C', h, w) and labels (B, H, W) with the same B; got {tuple(query.shape)} "
                f"and {tuple(labels.shape)}"
            )
        size = (int(query.shape[-2]), int(query.shape[-1]))
        for q, y in zip(query.detach(), labels, strict=True):
            self._update_image(q.flatten(1).t(), _resize_labels(y.to(q.device), size).flatten())

    def _update_image(self, rows: Tensor, labels: Tensor) -> None:
        num = rows.shape[0]
        valid = labels != self.ignore_index
        # Ignored pixels share a class of their own (index num_classes): never the class of a counted row.
        groups = torch.where(valid, labels, torch.full_like(labels, self.num_classes))
        onehot = F.one_hot(groups, self.num_classes + 1).to(torch.float64)
        counts = onehot.sum(0)
        qhat = F.normalize(rows.to(torch.float64), dim=-1, eps=1e-8)
        for start in range(0, num, self.block_size):
            stop = min(start + self.block_size, num)
            keep = valid[start:stop]
            if not bool(keep.any()):
                continue
            relu_sim = (qhat[start:stop] @ qhat.t()).clamp_min(0.0)
            attention = relu_sim / relu_sim.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            entropy = torch.special.entr(attention).sum(-1)
            same = ((attention @ onehot) * onehot[start:stop]).sum(-1)
            chance = counts[groups[start:stop]] / num
            self.sums += torch.stack(
                [
                    entropy[keep].sum(),
                    torch.tensor(math.log(num) * int(keep.sum()), dtype=torch.float64),
                    same[keep].sum(),
                    chance[keep].sum(),
                ]
            ).cpu()
            self.rows += int(keep.sum())
        self.images += 1

    def compute(self) -> dict[str, float]:
        """``{"entropy", "uniform_entropy", "same_class_share", "chance_share", "lift", "images", "rows"}``."""
        if self.rows == 0:
            raise ValueError("AttentionQuality.compute: no labelled pixel was seen")
        entropy, uniform, same, chance = (float(v) / self.rows for v in self.sums)
        return {
            "entropy": entropy,
            "uniform_entropy": uniform,
            "same_class_share": same,
            "chance_share": chance,
            "lift": same / chance if chance > 0 else float("nan"),
            "images": float(self.images),
            "rows": float(self.rows),
        }


def measure_attention_quality(
    network: nn.Module,
    sam: nn.Module,
    dataset: Any,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    indices: Sequence[int] | None = None,
) -> AttentionQuality:
    """Run ``network`` and ``sam``'s transform over labelled images and accumulate :class:`AttentionQuality`.

    Args:
        network: Returns pre-upsample logits ``(B, C, h, w)`` (put in eval mode for the pass, then restored).
        sam: A :class:`~uda_sam.nn.SelfAttentionModule` (its ``transform`` gives ``Q``; prediction layer only).
        dataset: Samples ``{"image", "mask"}`` with ground-truth masks.
        device: Where to run.
        max_images: Use at most this many images (the first ones, or the first of ``indices``).
        indices: The images to use (e.g. one DDP rank's share); default all.

    Returns:
        The accumulator (sum it across processes through its ``sums``, ``rows`` and ``images``).
    """
    chosen = list(range(len(dataset))) if indices is None else list(indices)
    if max_images is not None:
        chosen = chosen[:max_images]
    quality = AttentionQuality(num_classes=int(getattr(network, "num_classes", NUM_CLASSES)))
    with eval_mode(network, sam), torch.no_grad():
        for index in chosen:
            sample = dataset[index]
            logits = network(sample["image"][None].to(device))
            quality.update(sam.transform(logits), sample["mask"][None])
    return quality


# ----------------------------------------------------------------------------------------------------- display
def jet_colormap(values: np.ndarray) -> np.ndarray:
    """A jet-like colour ramp (blue -> cyan -> yellow -> red) for values in ``[0, 1]``; returns uint8 ``(..., 3)``."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G, B peak
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray | Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap in ``[0, 1]`` (coloured with :func:`jet_colormap`) over an RGB image.

    The heatmap is upsampled bilinearly (``align_corners=True``, as the logits are) to the image size.

    Args:
        image_rgb: uint8 ``(H, W, 3)``.
        heatmap: ``(h, w)`` values in ``[0, 1]`` (clipped).
        alpha: Weight of the heatmap colours.

    Returns:
        uint8 ``(H, W, 3)``.

    Raises:
        ValueError: On shapes other than ``(H, W, 3)`` / ``(h, w)`` or ``alpha`` outside ``[0, 1]``.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_rgb must be an (H, W, 3) uint8 array; got shape {image.shape}")
    heat = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, Tensor) else heatmap))
    if heat.dim() != 2:
        raise ValueError(f"heatmap must be an (h, w) array; got shape {tuple(heat.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    size = image.shape[:2]
    heat = heat.float()
    if tuple(heat.shape) != size:
        heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
    colours = jet_colormap(heat.numpy()).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def denormalize(image: Tensor, normalization: Literal["imagenet", "caffe"] = "imagenet") -> np.ndarray:
    """Undo the input normalisation of one image for display.

    Args:
        image: ``(3, H, W)`` or ``(1, 3, H, W)`` float tensor.
        normalization: ``"imagenet"`` (RGB, mean/std) or ``"caffe"`` (BGR, mean-subtracted 0-255).

    Returns:
        uint8 RGB ``(H, W, 3)``.

    Raises:
        ValueError: On a bad shape or an unknown normalisation.
    """
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor; got shape {tuple(image.shape)}")
    return _denormalize_chw(image, normalization)
