"""The self-attention module (SAM) of docs/METHOD.md, equations (4)-(7), and its attention kernels.

For logits ``P`` of shape ``(B, C, h, w)`` (``N = h * w`` pixel rows of ``C`` logits each)::

    Q     = Conv(P)                                   # transform, C -> C' channels
    A_ij  = <Q_i, Q_j> / (|Q_i| |Q_j|)                # (4) cosine similarity of pixel rows
    Â_ij  = relu(A_ij) / sum_k relu(A_ik)             # (5) rows sum to 1
    P_sa  = Â P                                       # (6), (7) mix the rows of P (not of Q)

Two exact kernels compute ``Â V`` for row matrices ``Q`` and ``V``:

- ``"full"`` materialises the ``N x N`` matrix and lets autograd differentiate it (the reference; about
  ``6 * B * N^2 * 4`` bytes at the peak of forward + backward).
- ``"blockwise"`` processes ``block_size`` rows of ``Â`` at a time inside a custom autograd function and recomputes
  each block in the backward pass, so forward and backward hold ``O(N * block_size)`` extra memory.

Both run in float32 (float64 inputs stay float64) with autocast disabled, so bf16 training keeps the similarity and
the normalisation exact enough; the module returns its input's dtype. (Matmuls still follow
``torch.set_float32_matmul_precision``: with TF32 enabled on a GPU the similarities carry ~1e-3 error.)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUTO_FULL_MAX_BYTES",
    "AttentionImpl",
    "SelfAttentionModule",
    "attention_map",
    "normalize_rows",
    "relu_cosine_attention",
    "relu_cosine_similarity",
]

AttentionImpl = Literal["auto", "full", "blockwise"]
_IMPLS: tuple[str, ...] = get_args(AttentionImpl)

#: ``impl="auto"`` uses the full matrix while one ``B x N x N`` float32 matrix stays within this many bytes.
AUTO_FULL_MAX_BYTES: int = 256 * 2**20


def _no_autocast(device: torch.device) -> AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (handy for gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _safe_reciprocal(denom: Tensor) -> Tensor:
    """``1 / denom`` where ``denom > 0`` and 0 elsewhere (an all-zero attention row gives a zero output row)."""
    tiny = torch.finfo(denom.dtype).tiny
    return torch.where(denom > 0, denom.clamp_min(tiny).reciprocal(), torch.zeros_like(denom))


def normalize_rows(rows: Tensor, eps: float = 1e-8) -> Tensor:
    """Divide each row (last axis) by its L2 norm, guarding norms below ``eps``.

    Args:
        rows: Tensor ``(..., D)``.
        eps: Norms are clamped to at least ``eps``, so a zero row stays zero instead of becoming NaN.

    Returns:
        Tensor of the same shape whose non-zero rows have unit norm.
    """
    return F.normalize(rows, p=2.0, dim=-1, eps=eps)


def relu_cosine_similarity(rows_a: Tensor, rows_b: Tensor, eps: float = 1e-8) -> Tensor:
    """``relu(cos(a_i, b_j))`` for every pair of rows: equation (13) and the maps of Fig. 3 / Fig. E.4.

    Computed in float32 (float64 stays float64) with autocast disabled.

    Args:
        rows_a: Tensor ``(..., Na, D)``.
        rows_b: Tensor ``(..., Nb, D)`` with the same leading (batch) shape and ``D``.
        eps: Guard on the row norms; a zero row has similarity 0 with everything.

    Returns:
        Tensor ``(..., Na, Nb)`` with values in ``[0, 1]``.

    Raises:
        ValueError: If the inputs have fewer than 2 dimensions or different row widths ``D``.
    """
    if rows_a.dim() < 2 or rows_b.dim() < 2:
        raise ValueError(
            f"rows_a and rows_b must be (..., N, D) tensors; got shapes {tuple(rows_a.shape)} and {tuple(rows_b.shape)}"
        )
    if rows_a.shape[-1] != rows_b.shape[-1]:
        raise ValueError(
            f"rows_a and rows_b must have the same row width D; got {rows_a.shape[-1]} and {rows_b.shape[-1]}"
        )
    dtype = _compute_dtype(torch.promote_types(rows_a.dtype, rows_b.dtype))
    with _no_autocast(rows_a.device):
        a = normalize_rows(rows_a.to(dtype), eps)
        b = normalize_rows(rows_b.to(dtype), eps)
        return torch.matmul(a, b.transpose(-1, -2)).clamp_min_(0.0)


def attention_map(query: Tensor, eps: float = 1e-8) -> Tensor:
    """The normalised attention ``Â`` of equations (4)-(5) as a full ``(B, N, N)`` matrix.

    Args:
        query: Rows ``Q`` of shape ``(B, N, D)``.
        eps: Guard on the row norms.

    Returns:
        ``(B, N, N)`` float32 (float64 for float64 input) matrix whose non-zero rows sum to 1; the row of a zero
        query row is all zeros.
    """
    with _no_autocast(query.device):
        qhat = normalize_rows(query.to(_compute_dtype(query.dtype)), eps)
        relu_sim = torch.bmm(qhat, qhat.transpose(1, 2)).relu()
        denom = relu_sim.sum(dim=-1, keepdim=True)
        # clamp_min (not where) keeps the backward pass free of 0 * inf for an all-zero row.
        return relu_sim / denom.clamp_min(torch.finfo(denom.dtype).tiny)


class _BlockwiseReluCosineAttention(torch.autograd.Function):
    """``Y = Â V`` for unit-norm rows ``Qhat``, recomputing each row block of ``Â`` in the backward pass.

    Forward, per row block ``I``: ``R_I = relu(Qhat_I Qhat^T)``, ``[R_I V, d_I] = R_I [V, 1]`` (the row sums ride
    along as an extra column), ``Y_I = R_I V / d_I``.

    Backward, with ``g_i = dY_i / d_i`` and ``delta_i = g_i . Y_i`` (the softmax-style correction of the row
    normalisation): ``dV += R_I^T g_I``; ``dR_I = [g_I, -delta_I] [V, 1]^T``, masked where ``R = 0`` to give ``dS_I``;
    ``dQhat_I += dS_I Qhat`` and ``dQhat += dS_I^T Qhat_I`` (``S`` uses ``Qhat`` on both sides).

    Only the ``N x N`` part lives here; the row normalisation of ``Q`` stays outside, differentiated by autograd.
    """

    @staticmethod
    def forward(ctx, qhat: Tensor, values: Tensor, block_size: int) -> Tensor:  # type: ignore[override]
        batch, num, channels = values.shape
        qhat_t = qhat.transpose(1, 2)
        values_aug = torch.cat([values, values.new_ones(batch, num, 1)], dim=-1)
        out = values.new_empty(batch, num, channels)
        denom = values.new_empty(batch, num)
        for start in range(0, num, block_size):
            stop = min(start + block_size, num)
            relu_sim = torch.bmm(qhat[:, start:stop], qhat_t).relu_()
            mixed = torch.bmm(relu_sim, values_aug)
            del relu_sim
            denom[:, start:stop] = mixed[..., channels]
            out[:, start:stop] = mixed[..., :channels] * _safe_reciprocal(mixed[..., channels]).unsqueeze(-1)
        ctx.save_for_backward(qhat, values, out, denom)
        ctx.block_size = block_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        qhat, values, out, denom = ctx.saved_tensors
        need_q, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        block_size = ctx.block_size
        batch, num, _ = values.shape
        with _no_autocast(values.device):
            grad = grad_out.to(values.dtype) * _safe_reciprocal(denom).unsqueeze(-1)  # g_i = dY_i / d_i
            grad_q = torch.zeros_like(qhat) if need_q else None
            grad_v = torch.zeros_like(values) if need_v else None
            if need_q:
                delta = (grad * out).sum(dim=-1, keepdim=True)
                grad_aug = torch.cat([grad, -delta], dim=-1)
                values_aug_t = torch.cat([values, values.new_ones(batch, num, 1)], dim=-1).transpose(1, 2)
            qhat_t = qhat.transpose(1, 2)
            for start in range(0, num, block_size):
                stop = min(start + block_size, num)
                q_block = qhat[:, start:stop]
                relu_sim = torch.bmm(q_block, qhat_t).relu_()
                if grad_v is not None:
                    grad_v.baddbmm_(relu_sim.transpose(1, 2), grad[:, start:stop])
                if grad_q is not None:
                    grad_sim = torch.bmm(grad_aug[:, start:stop], values_aug_t)
                    # relu's derivative, in place: 0 where the similarity was clipped (relu(s) == 0 <=> s <= 0).
                    # This is the kernel autograd uses for relu; one pass, no mask tensor.
                    torch.ops.aten.threshold_backward.grad_input(grad_sim, relu_sim, 0.0, grad_input=grad_sim)
                    del relu_sim
                    grad_q[:, start:stop] += torch.bmm(grad_sim, qhat)
                    grad_q.baddbmm_(grad_sim.transpose(1, 2), q_block)
                    del grad_sim
                else:
                    del relu_sim
        return grad_q, grad_v, None


def _check_rows(query: Tensor, values: Tensor) -> None:
    if query.dim() != 3 or values.dim() != 3:
        raise ValueError(
            f"query and values must be (B, N, D) row tensors; got shapes {tuple(query.shape)} and {tuple(values.shape)}"
        )
    if query.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"query and values must share (B, N); got {tuple(query.shape[:2])} and {tuple(values.shape[:2])}"
        )


def relu_cosine_attention(
    query: Tensor,
    values: Tensor,
    impl: Literal["full", "blockwise"] = "blockwise",
    block_size: int = 2048,
    eps: float = 1e-8,
) -> Tensor:
    """``Â V`` with ``Â`` the row-normalised relu cosine similarity of the rows of ``query`` (equations (4)-(7)).

    Runs in float32 (float64 for float64 inputs) with autocast disabled; differentiable in ``query`` and ``values``.

    Args:
        query: Rows ``Q`` ``(B, N, D)`` that define the similarity.
        values: Rows ``V`` ``(B, N, C)`` that are mixed (``P`` in the paper).
        impl: ``"full"`` materialises ``Â``; ``"blockwise"`` never holds more than ``block_size`` rows of it.
        block_size: Rows per block for ``"blockwise"``.
        eps: Guard on the row norms of ``query``.

    Returns:
        ``(B, N, C)`` tensor in the compute dtype.

    Raises:
        ValueError: On shapes that are not ``(B, N, D)`` / ``(B, N, C)`` with matching ``(B, N)``, an unknown
            ``impl`` or a non-positive ``block_size``.
    """
    _check_rows(query, values)
    if impl not in ("full", "blockwise"):
        raise ValueError(f"impl must be 'full' or 'blockwise'; got {impl!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")
    dtype = _compute_dtype(torch.promote_types(query.dtype, values.dtype))
    with _no_autocast(query.device):
        query = query.to(dtype)
        values = values.to(dtype)
        if impl == "full":
            return torch.bmm(attention_map(query, eps), values)
        qhat = normalize_rows(query, eps).contiguous()
        return _BlockwiseReluCosineAttention.apply(qhat, values.contiguous(), int(block_size))


class SelfAttentionModule(nn.Module):
    """SAM: mixes every pixel's logits with those of the pixels whose (transformed) logits point the same way.

    ``forward(P) = Â P`` with ``Â = rownorm(relu(cos(Q_i, Q_j)))`` and ``Q = Conv(P)`` (docs/METHOD.md (4)-(7)).
    The skip connection ``P + P_sa`` and the losses belong to the caller (see ``self_attention_loss``).

    Choices: the transform is one ``nn.Conv2d`` with bias and "same" padding (odd kernels only), initialised with
    PyTorch's default; norms below ``eps`` are clamped, so a zero row of ``Q`` has similarity 0 with every pixel and
    its output row is 0 (no NaN).

    Args:
        num_classes: Channels ``C`` of the input logits (or features, for the feature-layer variant).
        embed_channels: Channels ``C'`` of ``Q``; ``None`` means ``num_classes``.
        kernel_size: Odd kernel size of the transform convolution.
        use_conv: ``False`` is the "No Conv" ablation: ``Q = P`` and the module has no parameters.
        impl: ``"full"`` (materialise ``N x N``), ``"blockwise"`` (row blocks with recomputation, memory linear in
            ``N``), or ``"auto"`` (full while ``B * N * N * 4`` bytes <= ``AUTO_FULL_MAX_BYTES``, else blockwise).
        block_size: Rows per block of the blockwise kernel.
        eps: Guard on the row norms of ``Q``.

    Raises:
        ValueError: On non-positive sizes, an even kernel, an unknown ``impl``, a non-positive ``eps``, or
            ``embed_channels != num_classes`` with ``use_conv=False``.
    """

    def __init__(
        self,
        num_classes: int,
        embed_channels: int | None = None,
        kernel_size: int = 1,
        use_conv: bool = True,
        impl: AttentionImpl = "auto",
        block_size: int = 2048,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
        if embed_channels is None:
            embed_channels = num_classes
        if embed_channels < 1:
            raise ValueError(f"embed_channels must be a positive integer or None; got {embed_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer (keeps h x w); got {kernel_size}")
        if not use_conv and embed_channels != num_classes:
            raise ValueError(
                f"use_conv=False means Q = P, so embed_channels must be None or num_classes ({num_classes}); "
                f"got {embed_channels}"
            )
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {list(_IMPLS)}; got {impl!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer; got {block_size}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.num_classes = int(num_classes)
        self.embed_channels = int(embed_channels)
        self.kernel_size = int(kernel_size)
        self.use_conv = bool(use_conv)
        self.impl: AttentionImpl = impl
        self.block_size = int(block_size)
        self.eps = float(eps)
        self.transform: nn.Module = (
            nn.Conv2d(num_classes, embed_channels, kernel_size, padding=kernel_size // 2)
            if use_conv
            else nn.Identity()
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_channels={self.embed_channels}, use_conv={self.use_conv}, "
            f"impl={self.impl!r}, block_size={self.block_size}"
        )

    def _check_input(self, logits: Tensor) -> None:
        if logits.dim() != 4:
            raise ValueError(
                f"SelfAttentionModule expects logits of shape (B, C, h, w); got shape {tuple(logits.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"SelfAttentionModule was built for C={self.num_classes} channels; got logits with "
                f"{logits.shape[1]} channels (shape {tuple(logits.shape)})"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor; got dtype {logits.dtype}")

    def resolve_impl(self, batch: int, num_pixels: int) -> Literal["full", "blockwise"]:
        """The kernel used for a batch of ``batch`` maps of ``num_pixels`` pixels."""
        if self.impl == "auto":
            return "full" if batch * num_pixels * num_pixels * 4 <= AUTO_FULL_MAX_BYTES else "blockwise"
        return self.impl

    def _rows(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel rows of ``Q`` ``(B, N, C')`` and of ``P`` ``(B, N, C)``."""
        query = self.transform(logits)
        return query.flatten(2).transpose(1, 2), logits.flatten(2).transpose(1, 2)

    def forward(self, logits: Tensor) -> Tensor:
        """Compute ``P_sa = Â P``.

        Args:
            logits: ``P``, pre-upsample logits ``(B, C, h, w)``.

        Returns:
            ``P_sa`` ``(B, C, h, w)`` in the dtype of ``logits``.
        """
        self._check_input(logits)
        batch, channels, height, width = logits.shape
        query, values = self._rows(logits)
        impl = self.resolve_impl(batch, height * width)
        mixed = relu_cosine_attention(query, values, impl=impl, block_size=self.block_size, eps=self.eps)
        return mixed.transpose(1, 2).reshape(batch, channels, height, width).to(logits.dtype)

    def attention(self, logits: Tensor) -> Tensor:
        """The normalised attention map ``Â`` (materialised: meant for small inputs and visualisation).

        Args:
            logits: ``P`` ``(B, C, h, w)``.

        Returns:
            ``(B, N, N)`` float32 map, ``N = h * w`` in row-major pixel order; non-zero rows sum to 1.
        """
        self._check_input(logits)
        query, _ = self._rows(logits)
        return attention_map(query, self.eps)
