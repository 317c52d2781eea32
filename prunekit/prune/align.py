"""Channel alignment: round each layer's kept-filter count to a multiple of N.

Odd channel counts (the paper's 331, 181, 107...) miss the vectorised and tensor-core code paths of
GPU and CPU kernels, so a model with fewer multiply-adds can run slower than the original. After
the paper's selection rule has chosen which filters to remove, alignment moves the count of a layer
to the **nearest** admissible width (ties go up), changing as few filters as possible:

- admissible widths are the multiples of N in ``[N, original]`` plus the original width itself
  (a layer that is not pruned at all is always fine);
- when the count goes up, the least sparse of the removed filters come back; when it goes down,
  the most sparse of the kept filters go, so the kept set is always the least sparse ones that the
  selection's own choice allows;
- a layer whose original width is below N, or whose count already is admissible, keeps its mask
  as it is; ``multiple=1`` is the paper's method unchanged.

Nearest rather than always-up keeps the parameter count close to the paper's; "never below N"
keeps every layer alive (a layer pruned to zero filters would disconnect the network).
"""

from __future__ import annotations

import torch


def aligned_count(kept: int, original: int, multiple: int) -> int:
    """The admissible filter count nearest to ``kept`` (ties up), per the module docstring's rule."""
    if multiple < 1:
        raise ValueError(f"alignment multiple must be >= 1, got {multiple}")
    if not 0 <= kept <= original:
        raise ValueError(f"kept filter count {kept} outside 0..{original}")
    if multiple == 1 or original < multiple:
        return kept
    if kept == original or (kept >= multiple and kept % multiple == 0):
        return kept
    down = (kept // multiple) * multiple
    up = down + multiple
    choices = [c for c in (down, up) if multiple <= c <= original]
    if original % multiple:  # the unpruned width is admissible even when not a multiple
        choices.append(original)
    # nearest; on a tie the larger count (more filters kept is the safer error for accuracy)
    return min(choices, key=lambda c: (abs(c - kept), -c))


def align_keep(keep_mask: torch.Tensor, filter_sparsity: torch.Tensor, multiple: int) -> torch.Tensor:
    """Return a new boolean keep mask whose count is :func:`aligned_count` of the input's.

    ``keep_mask`` [C_out] bool: True = the selection keeps filter i. ``filter_sparsity`` [C_out]:
    the filter's sparsity score (fraction of zero rows; higher = more removable). Filters whose
    status changes are picked by that score, ties broken by index so the result is deterministic.
    The input tensors are not modified.
    """
    if keep_mask.dim() != 1 or filter_sparsity.shape != keep_mask.shape:
        raise ValueError(
            f"keep_mask and filter_sparsity must be 1-D of the same length, got "
            f"{tuple(keep_mask.shape)} and {tuple(filter_sparsity.shape)}"
        )
    keep = keep_mask.detach().to(torch.bool).cpu().clone()
    n = keep.numel()
    kept = int(keep.sum())
    target = aligned_count(kept, n, multiple)
    if target == kept:
        return keep.to(keep_mask.device)
    score = filter_sparsity.detach().to(torch.float64).cpu()
    index = torch.arange(n, dtype=torch.float64)
    if target > kept:
        # bring back the least sparse removed filters
        cand = (~keep).nonzero().flatten()
        order = _lexsort(score[cand], index[cand])
        keep[cand[order[: target - kept]]] = True
    else:
        # drop the most sparse kept filters (ties: the later index goes first)
        cand = keep.nonzero().flatten()
        order = _lexsort(-score[cand], -index[cand])
        keep[cand[order[: kept - target]]] = False
    return keep.to(keep_mask.device)


def _lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``primary`` then ``secondary`` (both ascending)."""
    order = torch.argsort(secondary, stable=True)
    return order[torch.argsort(primary[order], stable=True)]


def align_counts(counts: dict[str, int], original: dict[str, int], multiple: int) -> dict[str, int]:
    """Aligned kept-filter counts per layer (for reports and what-if tables; no masks needed).

    Layers missing from ``original`` are taken as unpruned reference (their count is their width).
    """
    return {name: aligned_count(c, original.get(name, c), multiple) for name, c in counts.items()}
