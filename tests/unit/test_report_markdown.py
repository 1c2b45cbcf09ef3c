"""report.md reads on its own: a verdict per method (report.html's sentences), a glossary of the table's
columns, the two reward-model accuracies named by the pairs they were measured on, and how to reproduce it."""

from __future__ import annotations

from pathlib import Path

import yaml

from alignkit.eval.html_report import method_sentence
from alignkit.eval.report import TABLE, build_report, render_markdown

COMMIT = "0123456789abcdef0123456789abcdef01234567"
STAGES = {
    "sft": {"wall_s": 30.0, "eval_loss_before": 5.5, "eval_loss": 3.5},
    "rm": {"wall_s": 36.0, "eval_accuracy_before": 0.433, "eval_accuracy": 0.7, "eval_accuracy_stderr": 0.05,
           "eval_gold_accuracy": 0.769, "eval_n_pairs": 30.0},
    "dpo": {"wall_s": 20.0},
    "ppo": {"wall_s": 29.0, "eval_kl_before": 0.0, "eval_kl": 0.4, "eval_kl_stderr_before": 0.0, "eval_kl_stderr": 0.2},
}
EVAL = {
    "models": {
        "sft": {"gold_reward": 0.50, "gold_reward_stderr": 0.01, "kl": 0.0},
        "dpo": {"gold_reward": 0.56, "gold_reward_stderr": 0.01, "kl": 0.30, "gold_gain": 0.05, "gold_gain_stderr": 0.01},
        "ppo": {"gold_reward": 0.51, "gold_reward_stderr": 0.01, "kl": 0.40, "gold_gain": 0.01, "gold_gain_stderr": 0.01},
    },
    "reward_models": {"rm": {"n_pairs": 40, "accuracy": 0.525, "accuracy_stderr": 0.08, "gold_accuracy": 0.55,
                             "gold_accuracy_stderr": 0.08}},
    "n_prompts": 40, "n_samples": 2, "task": "sort", "baseline": "sft",
    "provenance": {"git": {"commit": COMMIT, "dirty": False}, "versions": {"alignkit": "0.1.0"}},
}


def rendered(tmp_path: Path) -> tuple[str, dict]:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "config.yaml").write_text(yaml.safe_dump({"pairs": "task:sort/prefs?n=40&seed=99"}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), "config_dir": "configs/tiny",
                                                          "stages": list(STAGES)}))
    report = build_report(STAGES, EVAL, [])
    return render_markdown(report, [], tmp_path), report


def test_one_verdict_per_method_the_same_sentence_as_report_html(tmp_path: Path):
    md, report = rendered(tmp_path)
    methods = report["methods"]
    for name, row in methods.items():
        assert f"- {method_sentence(name, row, 'sft', methods['sft'])[1]}\n" in md
    assert "- DPO beats SFT by 0.050 ± 0.010 gold at KL 0.30.\n" in md
    assert "- PPO does not beat SFT: +0.010 ± 0.010 gold (within 2 standard errors) at KL 0.40.\n" in md
    # the verdicts come before the table
    assert md.index("## Verdict") < md.index("| method |")


def test_every_column_has_a_glossary_line(tmp_path: Path):
    md, _ = rendered(tmp_path)
    glossary = md[md.index("Columns:"):]
    for column in TABLE:
        assert f"- **{column}**: " in glossary
    assert "nats per response" in glossary and "0-1" in glossary


def test_the_two_reward_model_accuracies_say_which_pairs_they_are_on(tmp_path: Path):
    md, _ = rendered(tmp_path)
    section = md[md.index("## Reward models"):md.index("## Alarms")]
    on_eval = next(line for line in section.splitlines() if "0.525" in line)
    on_own = next(line for line in section.splitlines() if "0.700" in line)
    assert "eval.pairs (`task:sort/prefs?n=40&seed=99`), 40 pairs" in on_eval
    assert "its own stage's held-out split" in on_own and "30 pairs" in on_own and "0.433 before" in on_own


def test_reproduce_names_the_commit_and_the_commands(tmp_path: Path):
    md, _ = rendered(tmp_path)
    section = md[md.index("## Reproduce"):]
    assert f"`git checkout {COMMIT[:12]}`" in section
    assert f"`alignkit pipeline --config {tmp_path / 'config.yaml'} output_dir=NEW_DIR`" in section
    assert "`configs/tiny`" in section and f"`alignkit report {tmp_path}`" in section


def test_the_stages_table_leaves_out_standard_errors(tmp_path: Path):
    md, _ = rendered(tmp_path)
    ppo_row = next(line for line in md.splitlines() if line.startswith("| ppo | 29.000"))
    assert "eval_kl: 0.000 → 0.400" in ppo_row and "stderr" not in ppo_row


def test_gold_per_task_columns_follow_gold_when_present(tmp_path: Path):
    import copy

    from alignkit.eval.report import table_columns

    md, report = rendered(tmp_path)
    assert table_columns(report["methods"]) == TABLE and "gold_reward/" not in md  # one task: the plain table
    two = copy.deepcopy(EVAL)
    two["models"]["dpo"].update({"gold_reward/sort": 0.7, "gold_reward/sort_stderr": 0.02, "gold_reward/reverse": 0.42,
                                 "gold_gain/sort": 0.2, "gold_gain/sort_stderr": 0.03})
    report = build_report(STAGES, two, [])
    dpo = report["methods"]["dpo"]
    assert dpo["gold_reward/sort"] == 0.7 and dpo["gold_gain_vs_sft/sort"] == 0.2 and dpo["gold_gain_vs_sft/sort_stderr"] == 0.03
    columns = table_columns(report["methods"])
    assert columns[:3] == ["gold_reward", "gold_reward/sort", "gold_reward/reverse"] and columns[3:] == TABLE[1:]
    md = render_markdown(report, [], tmp_path)
    assert "| method | gold_reward | gold_reward/sort | gold_reward/reverse | gold_gain_vs_sft |" in md
    assert "| 0.560 ± 0.010 | 0.700 ± 0.020 | 0.420 |" in md and "- **gold_reward/<task>**: " in md
