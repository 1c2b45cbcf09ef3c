"""alignkit.selection: k-center greedy vs brute force, k-means fixed point, best-of-n, RAFT counts."""

import math

import pytest
import torch

from alignkit import selection


def _unit(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# Angles 0, 10, 90, 180, 105 degrees; lengths differ to show that only the direction matters.
HAND_POINTS = torch.tensor(
    [_unit(0), _unit(10, 3.0), _unit(90, 0.5), _unit(180, 5.0), _unit(105, 2.0)]
)


def test_k_center_greedy_hand_made_2d():
    # Start at index 0 (0 deg). Cosine distances 1 - cos: to 10 -> 0.015, 90 -> 1, 180 -> 2,
    # 105 -> 1.259: pick 180 (3). Nearest-selected distances now: 10 -> 0.015, 90 -> 1,
    # 105 -> min(1.259, 1 - cos 75 = 0.741) = 0.741: pick 90 (2). Then 105 -> 1 - cos 15 = 0.034,
    # 10 -> 0.015: pick 105 (4), then 10 (1).
    assert selection.k_center_greedy(HAND_POINTS, 5) == [0, 3, 2, 4, 1]
    assert selection.k_center_greedy(HAND_POINTS, 2) == [0, 3]
    # From initial [3] (180 deg): 0 -> 2, 10 -> 1.985, 90 -> 1, 105 -> 0.741: pick 0; then
    # 90 -> 1 beats 105 -> 0.741 and 10 -> 0.015: pick 2; then 4, then 1. Initial is not returned.
    assert selection.k_center_greedy(HAND_POINTS, 4, initial=[3]) == [0, 2, 4, 1]


def _k_center_brute_force(embeddings, k, initial):
    """O(N^2 k): recompute every candidate's distance to every selected point each step."""
    unit = [row / row.norm() for row in embeddings.double()]
    selected = list(initial) if initial else [0]
    picks = [] if initial else [0]
    while len(picks) < k:
        best, best_distance = None, -1.0
        for i in range(len(unit)):
            if i in selected:
                continue
            distance = min(1.0 - float(unit[i] @ unit[j]) for j in selected)
            if distance > best_distance:
                best, best_distance = i, distance
        selected.append(best)
        picks.append(best)
    return picks


@pytest.mark.parametrize("initial", [None, [4, 17]])
def test_k_center_greedy_matches_brute_force(initial):
    torch.manual_seed(0)
    embeddings = torch.randn(60, 5)
    assert selection.k_center_greedy(embeddings, 12, initial) == _k_center_brute_force(embeddings, 12, initial)


def test_k_center_greedy_duplicates_and_limits():
    # Three copies of one direction and one other: all 4 can be chosen, each exactly once.
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    picks = selection.k_center_greedy(embeddings, 4)
    assert picks[:2] == [0, 2] and sorted(picks) == [0, 1, 2, 3]
    assert selection.k_center_greedy(embeddings, 0) == []
    with pytest.raises(ValueError, match="k must be"):
        selection.k_center_greedy(embeddings, 3, initial=[0, 1])
    with pytest.raises(ValueError, match="initial"):
        selection.k_center_greedy(embeddings, 1, initial=[0, 0])


def test_k_center_greedy_large_n_without_n_by_n_matrix():
    # 40000 x 40000 float32 would be 6.4 GB; the running-min implementation needs O(N).
    torch.manual_seed(1)
    embeddings = torch.randn(40000, 8)
    picks = selection.k_center_greedy(embeddings, 3)
    assert len(set(picks)) == 3 and picks[0] == 0


def test_kmeans_separates_two_direction_clusters_by_hand():
    # Points near 0 deg and near 90 deg (lengths vary: spherical k-means ignores them).
    embeddings = torch.tensor(
        [_unit(-5), _unit(0, 4.0), _unit(5), _unit(85, 2.0), _unit(90), _unit(95, 0.1)]
    )
    centroids, assignments = selection.kmeans(embeddings, 2, seed=0)
    assert assignments[:3].unique().numel() == 1 and assignments[3:].unique().numel() == 1
    assert assignments[0] != assignments[3]
    # Each centroid is the normalised mean of its members: exactly 0 deg and 90 deg here.
    torch.testing.assert_close(centroids[assignments[0]], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(centroids[assignments[3]], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_kmeans_converges_to_a_lloyd_fixed_point_and_is_deterministic():
    torch.manual_seed(2)
    embeddings = torch.randn(200, 6)
    centroids, assignments = selection.kmeans(embeddings, 5, iters=100, seed=3)
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    for i in range(200):  # every point sits with its most similar centroid
        similarities = [float(unit[i] @ c) for c in centroids]
        assert similarities[assignments[i]] == pytest.approx(max(similarities), abs=1e-6)
    for c in range(5):  # every centroid is its members' normalised mean
        members = unit[assignments == c]
        assert len(members) > 0
        mean = members.mean(0)
        torch.testing.assert_close(centroids[c], mean / mean.norm(), atol=1e-5, rtol=0)
    again_centroids, again_assignments = selection.kmeans(embeddings, 5, iters=100, seed=3)
    assert torch.equal(again_assignments, assignments) and torch.equal(again_centroids, centroids)


def test_kmeans_with_fewer_distinct_points_than_k():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    centroids, assignments = selection.kmeans(embeddings, 3, seed=0)
    assert centroids.shape == (3, 2) and assignments.shape == (4,)
    assert assignments[0] == assignments[1] and assignments[2] == assignments[3]
    with pytest.raises(ValueError, match="k must be"):
        selection.kmeans(embeddings, 5)


def test_best_of_n_ties_go_to_first_index():
    rewards = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 1.0], [0.0, -1.0, -5.0], [7.0, 7.0, 7.0]])
    assert selection.best_of_n(rewards).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="NaN"):
        selection.best_of_n(torch.tensor([[1.0, float("nan")]]))


def test_best_of_n_matches_loop():
    torch.manual_seed(4)
    rewards = torch.randint(0, 4, (20, 6)).float()
    expected = [max(range(6), key=lambda k, row=row: (row[k], -k)) for row in rewards.tolist()]
    assert selection.best_of_n(rewards).tolist() == expected


def test_raft_filter_per_prompt_counts():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0]])
    assert selection.raft_filter(rewards, top_k=1).tolist() == [
        [False, True, False, False],
        [True, False, False, False],
    ]
    # top_fraction 0.5 of K=4 -> 2 per prompt.
    assert selection.raft_filter(rewards, top_fraction=0.5).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]
    # ceil(0.3 * 4) = 2 as well; a tiny fraction still keeps 1 per prompt.
    assert selection.raft_filter(rewards, top_fraction=0.3).sum(1).tolist() == [2, 2]
    assert selection.raft_filter(rewards, top_fraction=0.01).sum(1).tolist() == [1, 1]


def test_raft_filter_global_counts_and_ties():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0]])
    # Global top 25% of 8 = 2: the 4.0 and the 3.0, both in prompt 1.
    kept = selection.raft_filter(rewards, top_fraction=0.25, per_prompt=False)
    assert kept.tolist() == [[False] * 4, [True, False, False, True]]
    # 1-D input; 0.3 * 10 = 3 exactly (not 4 from float rounding); ties at the cut -> lower index.
    flat = torch.tensor([5.0, 1.0, 5.0, 2.0, 5.0, 5.0, 0.0, 3.0, 4.0, 1.0])
    assert selection.raft_filter(flat, top_fraction=0.3).nonzero().flatten().tolist() == [0, 2, 4]
    assert selection.raft_filter(flat, top_k=10).all()


def test_raft_filter_matches_loop():
    torch.manual_seed(5)
    rewards = torch.randn(6, 5)
    kept = selection.raft_filter(rewards, top_k=2)
    for b, row in enumerate(rewards.tolist()):
        best_two = sorted(range(5), key=lambda k, row=row: -row[k])[:2]
        assert sorted(kept[b].nonzero().flatten().tolist()) == sorted(best_two)


def test_raft_filter_validation():
    rewards = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        selection.raft_filter(rewards)
    with pytest.raises(ValueError, match="exactly one"):
        selection.raft_filter(rewards, top_fraction=0.5, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        selection.raft_filter(rewards, top_k=5)
    with pytest.raises(ValueError, match="top_fraction"):
        selection.raft_filter(rewards, top_fraction=0.0)
