"""alignkit.selection pieces of `alignkit select`: task centres, near-duplicates, coverage radius, each against
a slow obvious reference or a hand-built example."""

import math

import pytest
import torch

from alignkit import selection


def _unit(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


def test_task_centres_on_a_constructed_example():
    # Two clusters, centroids at 0 and 90 degrees. Task 0 has 3 rows near 0 deg and 1 near 90 deg: its
    # distribution centre is cluster 0 and its centre the row closest to 0 deg (row 1 at 2 deg, not
    # row 0 at 8 deg). Task 1 has 2 rows near 90 deg (cluster 1) and 1 near 0 deg: cluster 1, and
    # its row at 89 deg (row 5). Row 3 of task 0 at 90 deg exactly is closer to centroid 1 than row 5
    # but belongs to task 0: a task's centre is one of its own rows.
    embeddings = torch.tensor([_unit(8), _unit(2), _unit(-5, 3.0), _unit(90), _unit(80), _unit(89), _unit(1)])
    centroids = torch.tensor([_unit(0), _unit(90)])
    assignments = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    tasks = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    centres, clusters = selection.task_centres(embeddings, centroids, assignments, tasks)
    assert clusters.tolist() == [0, 1]
    assert centres.tolist() == [1, 5]


def test_task_centres_ties_go_to_lowest_cluster_and_index():
    # One task, two rows in each cluster: cluster 0 wins the tie; rows 0 and 2 are equally close: row 0.
    embeddings = torch.tensor([_unit(10), _unit(80), _unit(-10), _unit(100)])
    centroids = torch.tensor([_unit(0), _unit(90)])
    centres, clusters = selection.task_centres(embeddings, centroids, torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long))
    assert clusters.tolist() == [0] and centres.tolist() == [0]


def _task_centres_reference(embeddings, centroids, assignments, tasks):
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    cents = torch.nn.functional.normalize(centroids.double(), dim=1)
    out = []
    for t in range(int(tasks.max()) + 1):
        rows = [i for i in range(len(tasks)) if tasks[i] == t]
        counts = [sum(1 for i in rows if assignments[i] == c) for c in range(len(centroids))]
        best_cluster = counts.index(max(counts))
        members = [i for i in rows if assignments[i] == best_cluster]
        sims = [float(unit[i] @ cents[best_cluster]) for i in members]
        out.append(members[sims.index(max(sims))])
    return out


def test_task_centres_match_reference_on_random_points():
    torch.manual_seed(3)
    embeddings = torch.randn(300, 6)
    centroids, assignments = selection.kmeans(embeddings, 7, seed=1)
    tasks = torch.randint(0, 5, (300,))
    centres, _ = selection.task_centres(embeddings, centroids, assignments, tasks)
    assert centres.tolist() == _task_centres_reference(embeddings, centroids, assignments, tasks)


def _dedup_reference(embeddings, threshold, groups=None):
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    kept, drop = [], []
    for i in range(len(unit)):
        same = [j for j in kept if groups is None or groups[j] == groups[i]]
        if any(float(unit[i] @ unit[j]) >= threshold for j in same):
            drop.append(True)
        else:
            drop.append(False)
            kept.append(i)
    return drop


def test_near_duplicates_threshold_by_hand():
    # Angles 0, 10, 20, 90: cos(10 deg) = 0.985. At 0.98, row 1 duplicates row 0 and is dropped; row 2 is
    # 10 deg from the DROPPED row 1 but 20 deg (cos 0.940) from the kept row 0, so it stays (greedy over
    # kept rows). At 0.99 nothing is dropped; at 0.9 rows 1 and 2 both go.
    points = torch.tensor([_unit(0), _unit(10, 2.0), _unit(20), _unit(90)])
    assert selection.near_duplicates(points, 0.98).tolist() == [False, True, False, False]
    assert selection.near_duplicates(points, 0.99).tolist() == [False] * 4
    assert selection.near_duplicates(points, 0.90).tolist() == [False, True, True, False]
    # exact copies are always duplicates at any threshold <= 1
    assert selection.near_duplicates(torch.tensor([[1.0, 2.0], [2.0, 4.0]]), 1.0 - 1e-6).tolist() == [False, True]


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("grouped", [False, True])
def test_near_duplicates_match_reference(chunk_size, grouped):
    # Clumps of near-copies (chains included) around 40 random directions, so many pairs are over the threshold.
    torch.manual_seed(0)
    base = torch.randn(40, 8)
    embeddings = base[torch.randint(0, 40, (400,))] + 0.15 * torch.randn(400, 8)
    groups = torch.randint(0, 3, (400,)) if grouped else None
    drop = selection.near_duplicates(embeddings, 0.97, groups=groups, chunk_size=chunk_size)
    expected = _dedup_reference(embeddings, 0.97, groups)
    assert drop.tolist() == expected
    assert 20 < sum(expected) < 380  # the threshold really bites, both ways


def test_coverage_radius_by_hand_and_against_k_center():
    points = torch.tensor([_unit(0), _unit(90), _unit(180), _unit(45)])
    # From row 0 alone the farthest row is 180 deg: 1 - cos = 2. With rows 0 and 2: row 1 at 90 deg, 1.
    assert selection.coverage_radius(points, [0]) == pytest.approx(2.0)
    assert selection.coverage_radius(points, [0, 2]) == pytest.approx(1.0)
    torch.manual_seed(5)
    cloud = torch.randn(500, 4)
    picks = selection.k_center_greedy(cloud, 20)
    radii = [selection.coverage_radius(cloud, picks[:m], chunk_size=3) for m in (1, 5, 20)]
    assert radii[0] > radii[1] > radii[2]  # more centres, smaller radius
    random_20 = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:20].tolist()
    assert radii[2] < selection.coverage_radius(cloud, random_20)  # greedy beats chance on its own objective


def test_k_center_from_task_centres_matches_reference():
    # The kcenter method: centres first, then greedy picks; same picks as the brute-force reference of
    # test_selection, and the centres are never picked again.
    from tests.unit.test_selection import _k_center_brute_force

    torch.manual_seed(2)
    embeddings = torch.randn(80, 6)
    centroids, assignments = selection.kmeans(embeddings, 5, seed=0)
    tasks = torch.randint(0, 3, (80,))
    centres = selection.task_centres(embeddings, centroids, assignments, tasks)[0].tolist()
    picks = selection.k_center_greedy(embeddings, 10, initial=centres)
    assert picks == _k_center_brute_force(embeddings, 10, centres)
    assert not set(picks) & set(centres)
