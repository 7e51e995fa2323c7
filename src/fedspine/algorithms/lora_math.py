"""Pure tensor math over LoRA factors: stacking, padding, truncation, low-rank SVD, rank self-pruning.

Conventions: ``A`` is (r, in), ``B`` is (out, r), and an adapter adds ``s · B A`` to the weight, with
``s = alpha / r``. Global adapters kept by strategies use ``s = 1`` (the scaling folded into ``B``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedspine.types import LoraState


def stack_factors(
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(A_k, B_k, c_k)`` along the rank dimension so that ``B_s A_s = sum_k c_k B_k A_k`` exactly.

    The coefficient is applied to the A-block only (FLoRA): ``A_s = [c_1 A_1; ...]`` (sum r_k, in),
    ``B_s = [B_1, ..., B_K]`` (out, sum r_k). There are no cross terms.
    """
    a_stack = torch.cat([a.to(torch.float32) for a, _, _ in blocks], dim=0)  # (sum r_k, in)
    ranks = torch.tensor([a.shape[0] for a, _, _ in blocks])
    coefs = torch.tensor([coef for _, _, coef in blocks], dtype=torch.float32)
    a_stack.mul_(coefs.repeat_interleave(ranks)[:, None])  # in place: no scaled copy of every block
    b_stack = torch.cat([b.to(torch.float32) for _, b, _ in blocks], dim=1)  # (out, sum r_k)
    return a_stack, b_stack


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A with rows and B with columns up to ``rank`` (HetLoRA / zero-padding baselines)."""
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")
    a_pad = torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)
    b_pad = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return a_pad, b_pad


def truncate_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` components: ``A[:rank]``, ``B[:, :rank]`` (HetLoRA's distribution)."""
    return a[:rank].clone(), b[:, :rank].clone()


def lowrank_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``B A`` in factored form, without forming ``B A``.

    With ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR), ``B A = Q_b (R_b R_a^T) Q_a^T``, so the
    SVD of the small (R, R) core gives the SVD of the product. Singular values are split evenly:
    ``B' = U_r sqrt(S_r)``, ``A' = sqrt(S_r) V_r^T``; components come out in decreasing order, so the
    first r' of them are the best rank-r' approximation for every r' <= rank (FlexLoRA's slices).
    """
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (R, R)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b_new = (q_b @ u[:, :k]) * root  # (out, k)
    a_new = root[:, None] * (vh[:k] @ q_a.T)  # (k, in)
    if k < rank:  # fewer components than asked: pad with zeros so shapes stay predictable
        a_new, b_new = pad_rank(a_new, b_new, rank)
    return a_new.to(torch.float32), b_new.to(torch.float32)


def best_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``matrix`` (out, in) in the Frobenius norm, factored:
    ``(A, B)`` with ``B A`` the truncated SVD, singular values split evenly (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``). Fewer than ``rank`` components when the matrix has fewer nonzero ones."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    k = int(min(rank, int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0))
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).to(torch.float32), (u[:, :k] * root).to(torch.float32)


def delta_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B A||_F`` computed through the (r, r) Gram matrices: sqrt(trace((B^T B)(A A^T)))."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)  # convert once: HetLoRA calls this per module
    gram = (b64.T @ b64) * (a64 @ a64.T)  # (r, r) * (r, r)
    return math.sqrt(max(float(gram.sum()), 0.0))


def tail_ratio(a: torch.Tensor, b: torch.Tensor, keep: int) -> float:
    """``||B_tail A_tail|| / ||B A||``: how much the components beyond ``keep`` contribute."""
    total = delta_norm(a, b)
    if total == 0.0 or keep >= a.shape[0]:
        return 0.0
    return delta_norm(a[keep:], b[:, keep:]) / total


def self_pruned_rank(a: torch.Tensor, b: torch.Tensor, gamma: float, threshold: float) -> int:
    """HetLoRA's local rank self-pruning: drop the tail beyond ``floor(gamma r)`` if it is small.

    Returns the new rank: ``floor(gamma r)`` (at least 1) when the tail's share of ``||B A||`` is
    below ``threshold``, otherwise ``r``.
    """
    rank = a.shape[0]
    keep = max(1, math.floor(gamma * rank))
    return keep if keep < rank and tail_ratio(a, b, keep) < threshold else rank


def fresh_factors(
    out_features: int, in_features: int, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new adapter as peft initialises one: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
    a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(out_features, rank)


def fresh_adapter(shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator) -> LoraState:
    """A new adapter of ``rank`` on every module of ``shapes`` (``(out, in)``), as :func:`fresh_factors`."""
    state: LoraState = {}
    for module, (out_f, in_f) in sorted(shapes.items()):
        a, b = fresh_factors(out_f, in_f, rank, generator)
        state[module] = {"A": a, "B": b}
    return state


def cut_to(start: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``start`` (float32) cut to ``like``'s shape: the received factor of a device that lowered its
    rank and uploads fewer components."""
    if start.shape == like.shape:
        return start.float()
    return start[tuple(slice(0, n) for n in like.shape)].float()
