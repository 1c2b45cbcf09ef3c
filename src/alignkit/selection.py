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


def closest_members(
    embeddings: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor,
    groups: torch.Tensor, group_cluster: torch.Tensor,
) -> torch.Tensor:
    """Per group, its member in a given cluster most cosine-similar to that cluster's centroid.

    embeddings [N,D], centroids [C,D], assignments long [N] (cluster of each row), groups long [N]
    (group id of each row, in [0, G)), group_cluster long [G] (the cluster each group is matched
    to). Returns long [G]: for group g, the row i with groups[i] == g and assignments[i] ==
    group_cluster[g] of highest cos(row, centroid) (lowest index on ties), or -1 when group g has
    no row in that cluster. Vectorised over N (scatter reductions), no loop over rows or groups.
    """
    points = _unit_rows(embeddings)
    n, g = points.shape[0], group_cluster.shape[0]
    unit_centroids = _unit_rows(centroids)
    eligible = assignments == group_cluster[groups]
    score = (points * unit_centroids[assignments]).sum(dim=1).masked_fill(~eligible, float("-inf"))
    best = torch.full((g,), float("-inf"), device=points.device).scatter_reduce(0, groups, score, "amax")
    hit = eligible & (score == best[groups])
    index = torch.where(hit, torch.arange(n, device=points.device), torch.full_like(groups, n))
    first = torch.full((g,), n, dtype=torch.long, device=points.device).scatter_reduce(0, groups, index, "amin")
    return torch.where(first == n, torch.full_like(first, -1), first)


def task_centres(
    embeddings: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, tasks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chen et al. 2023's task centres. -> (centre row long [T], centre cluster long [T]).

    embeddings [N,D], centroids [C,D] and assignments long [N] from k-means; tasks long [N] with
    ids in [0, T), every id present. A task's distribution centre is the cluster where most of its
    rows fall (lowest cluster id on ties); its task centre is its own row in that cluster most
    cosine-similar to the centroid (lowest index on ties). Cost O(N*D + T*C).
    """
    n_tasks, n_clusters = int(tasks.max()) + 1, centroids.shape[0]
    counts = torch.bincount(tasks * n_clusters + assignments, minlength=n_tasks * n_clusters)
    if bool((counts.view(n_tasks, n_clusters).sum(dim=1) == 0).any()):
        raise ValueError("every task id in [0, T) needs at least one row")
    centre_cluster = torch.argmax(counts.view(n_tasks, n_clusters), dim=1)  # first maximal cluster
    return closest_members(embeddings, centroids, assignments, tasks, centre_cluster), centre_cluster


def near_duplicates(
    embeddings: torch.Tensor, threshold: float, groups: torch.Tensor | None = None, chunk_size: int = 1024
) -> torch.Tensor:
    """Near-duplicate rows to drop. embeddings [N,D] -> bool [N] (True: drop).

    Greedy in index order: row i is dropped when cos(i, j) >= threshold for an earlier row j that
    is KEPT, so every dropped row has a kept near-duplicate and a chain a~b~c with a, c apart keeps
    a and c. With groups (long [N]) only rows of one group are compared (SemDeDup: within k-means
    clusters, O(sum of group_size^2 * D) instead of O(N^2 * D)). Memory O(chunk_size * group_size).

    Within a chunk the greedy rule is solved as a fixed point: keep[i] = no kept earlier row within
    the threshold. Each sweep fixes at least the next undecided row, and the greedy answer is the
    only fixed point, so sweeping until nothing changes is exact (few sweeps: duplicate chains are
    short).
    """
    points = _unit_rows(embeddings)
    n = points.shape[0]
    drop = torch.zeros(n, dtype=torch.bool, device=points.device)
    if groups is None:
        members_of = [torch.arange(n, device=points.device)]
    else:
        order = torch.argsort(groups, stable=True)  # stable: index order within a group
        sizes = torch.bincount(groups).tolist()
        members_of = [m for m in torch.split(order, sizes) if m.numel()]
    for members in members_of:
        kept = points[members[:0]]
        for start in range(0, members.numel(), chunk_size):
            rows = members[start:start + chunk_size]
            block = points[rows]
            clash_before = (block @ kept.T >= threshold).any(dim=1) if kept.shape[0] else torch.zeros(
                rows.numel(), dtype=torch.bool, device=points.device)
            earlier = torch.ones(rows.numel(), rows.numel(), device=points.device).tril(-1).bool()
            clash = (block @ block.T >= threshold) & earlier  # [b, b]: i clashes with an earlier j
            keep = ~clash_before
            while True:
                new_keep = ~clash_before & ~(clash & keep.unsqueeze(0)).any(dim=1)
                if torch.equal(new_keep, keep):
                    break
                keep = new_keep
            drop[rows] = ~keep
            kept = torch.cat([kept, block[keep]])
    return drop


def coverage_radius(embeddings: torch.Tensor, selected: list[int] | torch.Tensor, chunk_size: int = 256) -> float:
    """max over rows of the cosine distance (1 - cos) to the nearest selected row: the k-center
    objective. embeddings [N,D], selected: S >= 1 indices. O(N*S*D) time, O(N*chunk_size) memory."""
    points = _unit_rows(embeddings)
    index = torch.as_tensor(selected, dtype=torch.long, device=points.device)
    if index.numel() == 0:
        raise ValueError("coverage_radius needs at least one selected row")
    nearest = torch.full((points.shape[0],), float("inf"), device=points.device)
    for start in range(0, index.numel(), chunk_size):
        distance = 1.0 - points @ points[index[start:start + chunk_size]].T
        nearest = torch.minimum(nearest, distance.min(dim=1).values)
    return float(nearest.clamp(min=0.0).max())


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


# ----------------------------------------------------------------------- which comparisons to label
# Active labelling for iterative RLHF (`alignkit label select=...`, `alignkit iterate`): N candidate pairs,
# a budget of labels, and a reward model's (or an ensemble's) margins r(first) - r(second) per pair.


def candidate_pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered pair (i, j), i < j, of n responses to one prompt, in lexicographic order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _check_budget(n: int, budget: int) -> int:
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return min(budget, n)


def select_random_pairs(n: int, budget: int, generator: torch.Generator) -> list[int]:
    """min(budget, n) distinct pair indices drawn uniformly without replacement, in ascending order."""
    keep = _check_budget(n, budget)
    return sorted(torch.randperm(n, generator=generator)[:keep].tolist())


def select_uncertain_pairs(margins: torch.Tensor, budget: int) -> list[int]:
    """Uncertainty sampling: the min(budget, N) pairs whose reward margin is closest to 0. margins [N] -> indices.

    A margin near 0 is a pair the reward model cannot tell apart (Bradley-Terry probability near 1/2), the
    label it learns most from. Ties go to the lower index; returned in ascending index order."""
    if margins.dim() != 1:
        raise ValueError(f"margins must be [N], got shape {tuple(margins.shape)}")
    if torch.isnan(margins).any():
        raise ValueError("margins contain NaN")
    keep = _check_budget(margins.numel(), budget)
    order = torch.sort(margins.abs(), stable=True).indices
    return sorted(order[:keep].tolist())


def select_disagreement_pairs(member_margins: torch.Tensor, budget: int) -> list[int]:
    """Query by committee: the min(budget, N) pairs the ensemble disagrees on most. member_margins [M,N] -> indices.

    Disagreement is the standard deviation over the M members of the margin (ddof=0), the same spread as
    eval.metrics.ensemble_disagreement. Ties go to the lower index; returned in ascending index order."""
    if member_margins.dim() != 2 or member_margins.shape[0] < 2:
        raise ValueError(f"member_margins must be [M>=2, N], got shape {tuple(member_margins.shape)}")
    if torch.isnan(member_margins).any():
        raise ValueError("margins contain NaN")
    keep = _check_budget(member_margins.shape[1], budget)
    spread = member_margins.double().std(dim=0, unbiased=False)
    order = torch.sort(spread, descending=True, stable=True).indices
    return sorted(order[:keep].tolist())


def first_option_probability(option_logits: torch.Tensor) -> torch.Tensor:
    """A judge's probability that the FIRST shown response is better. option_logits [N,2] -> [N].

    option_logits are the next-token logits of the two option tokens ("A", "B") after the judge prompt;
    the probability is renormalised over those two tokens: softmax(option_logits)[:, 0]."""
    if option_logits.dim() != 2 or option_logits.shape[1] != 2:
        raise ValueError(f"option_logits must be [N,2], got shape {tuple(option_logits.shape)}")
    return torch.softmax(option_logits.double(), dim=1)[:, 0]


def position_swapped_preference(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-swap debiasing of a pairwise judge. p_first_* [N] -> (prob a is better [N], tie [N] bool).

    p_first_ab: the judge's probability that the first response is better when shown (a, b); p_first_ba:
    the same with the order swapped, (b, a), so 1 - p_first_ba is its probability for a in that order.
    The preference for a is the mean of the two; a tie where the two orders disagree on the winner
    (one says a, the other b: the judge follows the position, not the content), or where both are exactly
    1/2 (Zheng et al. 2023, MT-Bench, section 3.4: "declare a tie if the two orders are inconsistent")."""
    if p_first_ab.shape != p_first_ba.shape or p_first_ab.dim() != 1:
        raise ValueError(f"p_first_ab and p_first_ba must be [N] alike, got {tuple(p_first_ab.shape)} and "
                         f"{tuple(p_first_ba.shape)}")
    a_in_first = p_first_ab.double()
    a_in_second = 1.0 - p_first_ba.double()
    prob_a = (a_in_first + a_in_second) / 2
    tie = (a_in_first > 0.5) != (a_in_second > 0.5)
    tie = tie | ((a_in_first == 0.5) & (a_in_second == 0.5))
    return prob_a, tie
