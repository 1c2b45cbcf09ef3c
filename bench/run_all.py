"""Run every alignkit-vs-TRL benchmark pair (or a subset) and write one table, markdown + JSON.

    python bench/run_all.py                                   # sft, rm, dpo, rl on tiny and smollm2 (hours on CPU)
    python bench/run_all.py --only sft,rm --model tiny --repeats 3
    python bench/run_all.py --only sft --model smollm2 --steps 5
    python bench/run_all.py --dry-run                         # print the commands, run nothing

Each (bench, model) runs as its own invocation of the bench script (bench_sft.py, bench_rm.py,
bench_dpo.py speed, bench_rl.py), one after the other, each writing its JSON into the work dir; the
scripts themselves run every framework in its own subprocess. The table has one row per comparison
(alignkit variant vs TRL variant) with both throughputs, the ratios (wall and per CPU-second), the peak
memory ratio, the MFU (sft measures its own; rm and dpo report model FLOPs per example, 6 x parameters x tokens
of a plain forward, divided here by the run's higher matmul peak), and whether the 1.3x-at-no-more-memory target is
met. The fp32 matmul peak (torch.mm 1024^3, one thread like the workers) is measured before and after,
and the header has the package versions, the git commit, `uptime`, and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, markdown_table, write_json  # noqa: E402

BENCHES = ["sft", "rm", "dpo", "rl"]
MODELS = ["tiny", "smollm2"]
TARGET = 1.3
SCRIPTS = {"sft": ["bench/bench_sft.py"], "rm": ["bench/bench_rm.py"], "dpo": ["bench/bench_dpo.py", "speed"],
           "rl": ["bench/bench_rl.py", "--variants", "alignkit-grpo,trl-grpo,alignkit-rloo,trl-rloo"]}
# (alignkit label, TRL label, comparison) per bench, as each script's JSON names its variants.
COMPARISONS = {
    "sft": [("alignkit", "trl", "sft vs SFTTrainer (packing)")],
    "rm": [("alignkit", "trl", "rm vs RewardTrainer")],
    "dpo": [("alignkit, ref precomputed", "trl, ref on the fly", "dpo default vs DPOTrainer default"),
            ("alignkit, ref precomputed", "trl, ref precomputed", "dpo, both precomputed"),
            ("alignkit, ref on the fly", "trl, ref on the fly", "dpo, both on the fly")],
    "rl": [("alignkit-grpo", "trl-grpo", "grpo vs GRPOTrainer"), ("alignkit-rloo", "trl-rloo", "rloo vs RLOOTrainer")],
}
PACKAGES = ["torch", "transformers", "trl", "accelerate", "peft", "datasets"]


# ---------------------------------------------------------------------------------- arguments


def _subset(text: str, allowed: list[str], what: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{what}: unknown {unknown or text!r}; choose from {','.join(allowed)}")
    return [x for x in allowed if x in chosen]  # canonical order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=lambda t: _subset(t, BENCHES, "--only"), default=BENCHES,
                        help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--model", type=lambda t: _subset(t, MODELS, "--model"), default=MODELS,
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=1, help="passed to every bench")
    parser.add_argument("--steps", type=int, default=0, help="passed to every bench (0: each script's default)")
    parser.add_argument("--quick", action="store_true", help="passed to every bench (their smoke settings)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the workers")
    parser.add_argument("--work-dir", default="/tmp/bench_runs/run_all", help="per-bench JSON and worker logs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "run_all"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--from-json", nargs="*", default=None, metavar="BENCH:MODEL=FILE",
                        help="build the table from existing bench JSONs instead of running (e.g. sft:tiny=x.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """One entry per (bench, model): the command that runs it and the JSON it writes."""
    work = Path(args.work_dir)
    out = []
    for bench in args.only:
        for model in args.model:
            json_path = work / f"{bench}_{model}.json"
            cmd = [sys.executable, *SCRIPTS[bench], "--model", model, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--work-dir", str(work / f"{bench}_{model}"), "--json", str(json_path)]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if args.quick:
                cmd += ["--quick"]
            out.append({"bench": bench, "model": model, "command": cmd, "json": str(json_path)})
    return out


# ------------------------------------------------------------------------------------- results


def medians_of(bench: str, model: str, report: dict) -> dict[str, dict]:
    """The per-variant medians of one bench JSON (bench_rl writes one model per file, the others a dict)."""
    if bench == "rl":
        return report.get("medians", {})
    return report.get("models", {}).get(model, {}).get("medians", {})


def mfu_of(m: dict, peak_gflops: float | None) -> float | None:
    """The bench's own MFU (sft), else its model FLOPs per example x examples/s over the peak (rm, dpo)."""
    if m.get("mfu") is not None:
        return m["mfu"]
    if m.get("flops_per_example") and peak_gflops:
        return m["flops_per_example"] * m["examples_per_s"] / (peak_gflops * 1e9)
    return None


def result_rows(bench: str, model: str, report: dict, peak_gflops: float | None = None) -> list[dict]:
    """One row per comparison present in a bench JSON; peak_gflops: this run's matmul peak (for MFU where the
    bench reports model FLOPs per example but no peak of its own)."""
    medians = medians_of(bench, model, report)
    own = [report[k]["gflops"] for k in ("matmul_before", "matmul_after") if k in report]
    peak_gflops = max(own) if own else peak_gflops
    rows = []
    for ours, theirs, label in COMPARISONS[bench]:
        if ours not in medians or theirs not in medians:
            continue
        a, b = medians[ours], medians[theirs]
        speed = a["examples_per_s"] / b["examples_per_s"]
        memory = a["peak_rss_mb"] / b["peak_rss_mb"]
        cpu_ratio = (a["examples_per_cpu_s"] / b["examples_per_cpu_s"]
                     if a.get("examples_per_cpu_s") and b.get("examples_per_cpu_s") else None)
        rows.append({
            "bench": bench, "model": model, "comparison": label, "alignkit": ours, "trl": theirs,
            "alignkit_examples_per_s": a["examples_per_s"], "trl_examples_per_s": b["examples_per_s"],
            "ratio": speed, "ratio_per_cpu_s": cpu_ratio, "memory_ratio": memory,
            "alignkit_peak_mb": a["peak_rss_mb"], "trl_peak_mb": b["peak_rss_mb"],
            "alignkit_mfu": mfu_of(a, peak_gflops), "trl_mfu": mfu_of(b, peak_gflops),
            "repeats": int(min(a.get("repeats", 1), b.get("repeats", 1))),
            "load": (min(a.get("load_before", 0), b.get("load_before", 0)), max(a.get("load_after", 0), b.get("load_after", 0))),
            "met": speed >= TARGET and memory <= 1.0,
            "matmul_gflops": [report[k]["gflops"] for k in ("matmul_before", "matmul_after") if k in report],
        })
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_table(rows: list[dict]) -> str:
    header = ["bench", "model", "comparison", "alignkit ex/s", "TRL ex/s", "ratio", "ratio per CPU-s", "memory ratio",
              "MFU % (alignkit / TRL)", "bench's matmul GFLOP/s", "repeats", "load avg", f"target >= x{TARGET}"]
    body = [[r["bench"], r["model"], r["comparison"], f"{r['alignkit_examples_per_s']:.2f}", f"{r['trl_examples_per_s']:.2f}",
             f"x{r['ratio']:.2f}", "-" if r["ratio_per_cpu_s"] is None else f"x{r['ratio_per_cpu_s']:.2f}",
             f"x{r['memory_ratio']:.2f}",
             "-" if r["alignkit_mfu"] is None else f"{100 * r['alignkit_mfu']:.1f} / {_fmt(r['trl_mfu'] and 100 * r['trl_mfu'], '.1f')}",
             "/".join(f"{g:.1f}" for g in r["matmul_gflops"]) or "-",
             str(r["repeats"]), f"{r['load'][0]:.1f}-{r['load'][1]:.1f}", "met" if r["met"] else "not met"]
            for r in rows]
    return markdown_table(header, body)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = sys.version.split()[0]
    try:
        out["alignkit_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["alignkit_commit"] = "unknown"
    return out


def render(report: dict) -> str:
    peaks = report.get("matmul", {})
    peak_text = (", ".join(f"{k} {v['gflops']:.1f}" for k, v in peaks.items())
                 or "not measured by this invocation (each bench's own, where it measures one, is in the table)")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [f"run_all {report['date']}: {report['cpus']} CPUs, threads/worker {report['threads']}; "
             f"fp32 matmul peak (1024^3, 1 thread) GFLOP/s: {peak_text}",
             f"versions: {versions}",
             *([f"before: {report['uptime_before']}", f"after:  {report['uptime_after']}"] if "uptime_before" in report else []),
             "", "```bash", report["command"],
             *(f"# table row(s) from {p['json']}" if p["command"][0] == "(existing)" else " ".join(shlex.quote(c) for c in p["command"])
               for p in report["plan"]), "```",
             "", render_table(report["rows"])]
    if report.get("failed"):
        lines += ["", "failed: " + "; ".join(f"{f['bench']}:{f['model']} ({f['error']})" for f in report["failed"])]
    return "\n".join(lines)


def build_report(args: argparse.Namespace, entries: list[dict], argv: list[str], peak_gflops: float | None = None) -> dict:
    """Rows from the JSONs the entries name (missing ones go to `failed`)."""
    rows, failed = [], []
    for e in entries:
        path = Path(e["json"])
        if not path.exists():
            failed.append({"bench": e["bench"], "model": e["model"], "error": e.get("error", f"no {path}")})
            continue
        rows += result_rows(e["bench"], e["model"], json.loads(path.read_text()), peak_gflops)
    return {"command": " ".join(["python", "bench/run_all.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "cpus": os.cpu_count(), "threads": args.threads, "versions": package_versions(), "plan": entries,
            "rows": rows, "failed": failed}


def matmul_child(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = "import json,sys; sys.path.insert(0, '.'); from bench.bench_rl import matmul_peak; print(json.dumps(matmul_peak()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_from_json(items: list[str]) -> list[dict]:
    entries = []
    for item in items:
        key, _, path = item.partition("=")
        bench, _, model = key.partition(":")
        if bench not in BENCHES or model not in MODELS or not path:
            raise SystemExit(f"--from-json: {item!r} is not BENCH:MODEL=FILE with BENCH in {BENCHES}, MODEL in {MODELS}")
        entries.append({"bench": bench, "model": model, "command": ["(existing)", path], "json": path})
    return entries


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from bench.bench_rl import uptime

    if args.from_json is not None:
        entries = parse_from_json(args.from_json)
        report = build_report(args, entries, argv)
    else:
        entries = plan(args)
        if args.dry_run:
            for e in entries:
                print(" ".join(shlex.quote(c) for c in e["command"]))
            return None
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        before, matmul = uptime(), {"before": matmul_child(args.threads)}
        print(f"{before}\nfp32 matmul peak {matmul['before']['gflops']:.1f} GFLOP/s", flush=True)
        for e in entries:
            print(f"\n>>> {e['bench']} {e['model']}: {' '.join(e['command'])}", flush=True)
            rc = subprocess.run(e["command"], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            if rc != 0:
                e["error"] = f"rc={rc}"
        matmul["after"] = matmul_child(args.threads)
        report = build_report(args, entries, argv, max(m["gflops"] for m in matmul.values()))
        report.update(matmul=matmul, uptime_before=before, uptime_after=uptime())
    report["text"] = render(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report["text"] + "\n")
    write_json(out.with_suffix(".json"), report)
    print("\n" + report["text"] + f"\n\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
