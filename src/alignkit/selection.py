"""Pure selection: coreset picking (k-center greedy, k-means) and response filtering (best-of-n, RAFT).

Imports torch and math only. Shapes: N=examples, D=embedding size, B=prompts, K=responses each.
Paper for each function: docs/papers.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 rows; an all-zero row stays zero (cosine distance 1 to everything)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N,D], got shape {tuple(embeddings.shape)}")
    return F.normalize(embeddings.float(), dim=1)


def k_center_greedy(
    embeddings: torch.Tensor, k: int, initial: list[int] | None = None
) -> list[int]:
    """Greedy k-center (farthest point) on cosine distance. embeddings [N,D] -> k new indices.

    Distance = 1 - cos(a, b) between L2-normalised rows. Each step picks the point whose distance
    to its nearest selected point is largest (first index on ties). Starts from `initial` (indices
    already selected, not returned); with no `initial` the first pick is index 0, which IS returned
    (deterministic, no seed needed). Returns k indices not in `initial`, in selection order.

    Cost O(N*k*D) time, O(N) extra memory: a running min-distance vector, never an N x N matrix.
    """
    points = _unit_rows(embeddings)
    n = points.shape[0]
    selected = list(initial or [])
    if len(set(selected)) != len(selected) or any(not 0 <= i < n for i in selected):
        raise ValueError(f"initial must be distinct indices in [0, {n}), got {selected}")
    if not 0 <= k <= n - len(selected):
        raise ValueError(f"k must be in [0, {n - len(selected)}] (N minus len(initial)), got {k}")
    if k == 0:
        return []
    min_distance = torch.full((n,), float("inf"), device=points.device)
    for index in selected:
        min_distance = torch.minimum(min_distance, 1.0 - points @ points[index])
    picks: list[int] = []
    if not selected:
        picks.append(0)
        min_distance = 1.0 - points @ points[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=points.device)
    chosen[selected + picks] = True
    while len(picks) < k:
        # Already-chosen points are masked out explicitly: rounding can leave their distance at
        # +1e-7, and exact duplicates of chosen points must still be pickable after them.
        candidate_distance = min_distance.masked_fill(chosen, float("-inf"))
        index = int(torch.argmax(candidate_distance))
        picks.append(index)
        chosen[index] = True
        min_distance = torch.minimum(min_distance, 1.0 - points @ points[index])
    return picks


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit rows [N,D] -> centroid indices [k]. Sampling weight is the squared
    euclidean distance to the nearest chosen centroid (= 2 - 2 cos for unit vectors)."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    indices = [first]
    nearest = (2.0 - 2.0 * (points @ points[first])).clamp(min=0.0)
    for _ in range(1, k):
        weights = nearest.clone()
        weights[indices] = 0.0
        if float(weights.sum()) <= 0.0:
            # Fewer distinct points than k: take the first unused index (deterministic).
            unused = torch.ones(n, dtype=torch.bool)
            unused[indices] = False
            index = int(torch.nonzero(unused)[0])
        else:
            index = int(torch.multinomial(weights, 1, generator=generator))
        indices.append(index)
        nearest = torch.minimum(nearest, (2.0 - 2.0 * (points @ points[index])).clamp(min=0.0))
    return torch.tensor(indices)


def kmeans(
    embeddings: torch.Tensor, k: int, iters: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine). embeddings [N,D] -> (centroids [k,D], assignments long [N]).

    Rows are L2-normalised; each point joins the centroid of highest cosine similarity (first on
    ties); a centroid is the normalised mean of its members. Centroids are unit vectors. Seeded
    with k-means++ from torch.Generator(seed), so the same seed gives the same result. An empty
    cluster is re-seeded with the point least similar to its own centroid. Stops early when no
    assignment changes.
    """
    points = _unit_rows(embeddings)
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (number of rows), got {k}")
    # Seeding runs on CPU so one seed gives the same start on any device.
    generator = torch.Generator().manual_seed(seed)
    seeds = _kmeans_plus_plus(points.cpu(), k, generator).to(points.device)
    centroids = points[seeds].clone()
    assignments = torch.full((n,), -1, dtype=torch.long, device=points.device)
    for _ in range(iters):
        new_assignments = torch.argmax(points @ centroids.T, dim=1)
        if torch.equal(new_assignments, assignments):
            break
        assignments = new_assignments
        centroids = _update_centroids(points, assignments, centroids)
    assignments = torch.argmax(points @ centroids.T, dim=1)
    return centroids, assignments


def _update_centroids(
    points: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """Normalised member means [k,D]; empty clusters take the worst-fitting point."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
    counts = torch.bincount(assignments, minlength=k)
    new_centroids = F.normalize(sums, dim=1)
    fit = (points * centroids[assignments]).sum(dim=1)
    for cluster in torch.nonzero(counts == 0).flatten().tolist():
        worst = int(torch.argmin(fit))
        new_centroids[cluster] = points[worst]
        fit[worst] = float("inf")  # each empty cluster gets a different point
    return new_centroids


def best_of_n(rewards: torch.Tensor) -> torch.Tensor:
    """Index of the highest-reward response per prompt. rewards [B,K] -> long [B].

    First index on ties. NaN rewards raise ValueError (argmax would silently pick them).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B,K], got shape {tuple(rewards.shape)}")
    if torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN")
    is_max = rewards == rewards.max(dim=1, keepdim=True).values
    return torch.argmax(is_max.to(torch.int8), dim=1)  # argmax returns the first maximal index


def _keep_count(n: int, top_fraction: float | None, top_k: int | None) -> int:
    """How many of n to keep: top_k, or ceil(top_fraction * n) with at least 1."""
    if (top_fraction is None) == (top_k is None):
        raise ValueError("give exactly one of top_fraction or top_k")
    if top_k is not None:
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must be in [1, {n}], got {top_k}")
        return top_k
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    # round() first: 0.3 * 10 is 3.0000000000000004 and must keep 3, not 4.
    return max(1, math.ceil(round(top_fraction * n, 6)))


def _top_mask_rows(rewards: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean [R,M]: the `keep` highest of each row; on ties the lower index wins."""
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(rewards, dtype=torch.bool)
    return mask.scatter(1, order[:, :keep], True)


def raft_filter(
    rewards: torch.Tensor,
    top_fraction: float | None = None,
    top_k: int | None = None,
    per_prompt: bool = True,
) -> torch.Tensor:
    """RAFT reward-ranked filter: which responses to keep for fine-tuning. -> bool, shape of rewards.

    rewards [B,K] with per_prompt=True: keep the best `top_k` (or ceil(top_fraction*K), at least 1)
    of each prompt's K responses. per_prompt=False, or rewards [N]: rank all responses together and
    keep top_k (or ceil(top_fraction*N)). Exactly one of top_fraction / top_k. Ties at the cut go to
    the lower index, so the count kept is exact and deterministic.
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B,K] or [N], got shape {tuple(rewards.shape)}")
    if torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN")
    if rewards.dim() == 2 and per_prompt:
        return _top_mask_rows(rewards, _keep_count(rewards.shape[1], top_fraction, top_k))
    flat = rewards.reshape(1, -1)
    keep = _keep_count(flat.shape[1], top_fraction, top_k)
    return _top_mask_rows(flat, keep).reshape(rewards.shape)
