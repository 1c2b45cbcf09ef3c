"""`alignkit report RUN_DIR`: rebuild report.html (and report.md, plots/) from an existing run dir, no model run.

RUN_DIR is a pipeline run dir (config.yaml with `stages`, or report.json; its stages' summary.json and
metrics.jsonl, eval/summary.json and eval/samples/ when the eval ran) or an `alignkit eval` run dir
(summary.json with "models", metrics.jsonl, samples/). A pipeline run that stopped before its eval still
gets a report: its stages, their curves and alarms, no method rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pipeline_stages(run: Path) -> list[str]:
    """Stage dirs of a pipeline run that completed (summary.json), in the pipeline's order when its config says."""
    import yaml

    config = run / "config.yaml"
    order = (yaml.safe_load(config.read_text()) or {}).get("stages") if config.exists() else None
    if not isinstance(order, list):
        order = sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != "eval")
    return [s for s in order if (run / s / "summary.json").exists()]


def is_pipeline_run(run: Path) -> bool:
    import yaml

    config = run / "config.yaml"
    cfg = yaml.safe_load(config.read_text()) if config.exists() else None
    return (run / "report.json").exists() or (isinstance(cfg, dict) and "stages" in cfg)


def rebuild_pipeline(run: Path) -> Path:
    """report.md, plots/ and report.html of a pipeline run, from its files (report.json is left as it is)."""
    from alignkit.eval.html_report import write_pipeline_html
    from alignkit.eval.report import build_report, render_markdown, stage_alarms, write_plots

    done = {s: run / s for s in pipeline_stages(run)}
    summaries = {s: json.loads((d / "summary.json").read_text()) for s, d in done.items()}
    old = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
    notes = old.get("notes") or []
    eval_summary = run / "eval" / "summary.json"
    if eval_summary.exists():
        report = build_report(summaries, json.loads(eval_summary.read_text()), notes)
    else:
        report = {"stages": summaries, "methods": {}, "alarms": stage_alarms(summaries), "notes": notes}
    plots = write_plots(run, done, report)
    (run / "report.md").write_text(render_markdown(report, plots, run))
    return write_pipeline_html(run, report, done)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignkit report", description="rebuild report.html (and a pipeline's "
                                     "report.md) from a pipeline or eval run dir; runs no model")
    parser.add_argument("run_dir", help="a pipeline run dir (output_dir of alignkit pipeline) or an eval run dir")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not run.is_dir():
        print(f"alignkit report: {run} is not a directory", file=sys.stderr)
        return 2
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    if is_pipeline_run(run):
        path = rebuild_pipeline(run)
    elif "models" in summary:
        from alignkit.eval.html_report import write_eval_html

        path = write_eval_html(run)
    else:
        print(f"alignkit report: {run} is neither a pipeline run dir (config.yaml with stages, or report.json) "
              f"nor an eval run dir (summary.json with models)", file=sys.stderr)
        return 2
    print(path)
    return 0
