"""The default pipeline's wall time against its budget (10 minutes on the reference 2-core machine).

Machines differ, and the fp32 matmul peak alone does not say how fast these small models run (they are bound by
per-operation overhead as much as by matmul speed). So beside the 2048^3 matmul peak (before and after the run)
this measures, in the same run, the planning figures the project's brief gives for the reference machine: a
from-scratch transformers Llama of ~0.9M and ~2.9M parameters trained on batch 64 x 64 tokens with AdamW (about
13,700 and 5,600 tokens/s there) and sampling 64 x 24 tokens (about 0.3 s there). Their ratio to the measured
figures is this machine's speed relative to the reference (measured before and after the run, the mean taken: machines
drift); the wall time times that ratio is the estimate for the reference machine.

    python bench/pipeline_budget.py [--out runs/pipeline-budget] [--config configs/tiny/pipeline.yaml] [--skip-run]

Writes <out>.json (the figures, the stages' times, the estimate) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUDGET_S = 600.0
# the brief's planning figures for the reference machine (2 cores, ~145 GFLOP/s fp32 matmul peak)
REFERENCE = {"train_0.9M_tokens_per_s": 13_700.0, "train_2.9M_tokens_per_s": 5_600.0, "sample_64x24_s": 0.3}
# (hidden, layers, intermediate) at vocab 512 with tied embeddings: 0.87M and 2.94M parameters
SIZES = {"0.9M": (128, 4, 352), "2.9M": (240, 4, 672)}


def planning_figures(threads: int = 2) -> dict[str, float]:
    """This machine's measurements of REFERENCE's figures (best of a few repeats each)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: dict[str, float] = {}
    for size, (hidden, layers, intermediate) in SIZES.items():
        config = LlamaConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=intermediate, max_position_embeddings=256, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        out[f"params_{size}"] = float(sum(p.numel() for p in model.parameters()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 512, (64, 64))

        def step() -> None:
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        for _ in range(3):
            step()
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            rates.append(64 * 64 * 5 / (time.perf_counter() - t0))
        out[f"train_{size}_tokens_per_s"] = max(rates)
        if size == "0.9M":
            model.eval()
            prompts = torch.randint(1, 512, (64, 16))
            kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=True, pad_token_id=0)
            with torch.no_grad():
                model.generate(prompts, **kwargs)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    model.generate(prompts, **kwargs)
                    times.append(time.perf_counter() - t0)
            out["sample_64x24_s"] = min(times)
    return out


def speed_vs_reference(measured: dict[str, float]) -> float:
    """How many times faster than the reference machine this one runs the planning figures (their geometric mean)."""
    ratios = [measured[k] / REFERENCE[k] for k in REFERENCE if k.endswith("tokens_per_s")]
    ratios.append(REFERENCE["sample_64x24_s"] / measured["sample_64x24_s"])
    return statistics.geometric_mean(ratios)


def stage_times(out: Path) -> dict[str, float]:
    """Each stage's own wall time (its summary.json), in the pipeline's directory."""
    times = {}
    for summary in sorted(out.glob("*/summary.json")):
        wall = json.loads(summary.read_text()).get("wall_s")
        if wall is not None:
            times[summary.parent.name] = round(float(wall), 1)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny/pipeline.yaml")
    parser.add_argument("--out", default="runs/pipeline-budget", help="the pipeline's output_dir (must not exist)")
    parser.add_argument("--skip-run", action="store_true", help="only the machine's figures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "budget_s": BUDGET_S, "reference": REFERENCE}
    result["peak_gflops_before"] = _peak()
    result["measured"] = planning_figures()
    result["speed_vs_reference"] = speed_vs_reference(result["measured"])
    before = result["speed_vs_reference"]
    if not args.skip_run:
        if out.exists():
            raise SystemExit(f"{out} exists: the pipeline would skip its complete stages")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "alignkit", "pipeline", "--config", args.config, f"output_dir={out}"],
                       check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")})
        result["wall_s"] = time.time() - t0
        result["stages_s"] = stage_times(out)
        # machines drift during a run: the speed is the mean of the figures before and after it
        result["measured_after"] = planning_figures()
        result["speed_vs_reference_after"] = speed_vs_reference(result["measured_after"])
        result["speed_vs_reference"] = (before + result["speed_vs_reference_after"]) / 2
        result["estimate_on_reference_s"] = result["wall_s"] * result["speed_vs_reference"]
        result["within_budget"] = result["estimate_on_reference_s"] <= BUDGET_S
    result["peak_gflops_after"] = _peak()
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("stages_s", "reference", "measured_after")}, indent=1))
    return result


def _peak() -> float:
    import torch

    from bench.bench_rl import matmul_peak

    torch.set_num_threads(2)
    return matmul_peak(2048, trials=5, min_s=0.4)["gflops"]


if __name__ == "__main__":
    main()
