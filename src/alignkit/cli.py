"""`alignkit <stage> [--config FILE] [key=value | --key value ...]` and `alignkit data check FILE`.

`python -m alignkit ...` is the same program, so `accelerate launch -m alignkit sft ...` works.
Stage modules are imported only when a stage runs, so `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

from alignkit import config as C

# stage name -> (module with run(cfg) -> summary, config class, one-line description)
STAGES: dict[str, tuple[str, type, str]] = {
    "pretrain": ("alignkit.stages.pretrain", C.PretrainConfig, "next-token pretraining on documents"),
    "sft": ("alignkit.stages.sft", C.SFTConfig, "supervised fine-tuning, loss on assistant tokens"),
    "rm": ("alignkit.stages.rm", C.RMConfig, "reward model: Bradley-Terry (+ Llama 2 margin), ranking over K responses"),
    "dpo": ("alignkit.stages.dpo", C.DPOConfig, "direct preference optimisation: DPO, IPO, conservative DPO"),
    "rrhf": ("alignkit.stages.rrhf", C.RRHFConfig, "rank K responses by reward; align length-normalised log-probs"),
    "label": ("alignkit.stages.label", C.LabelConfig, "comparison data: sample a model's responses, rank them by an annotator (simulated, gold or a reward model)"),
    "ppo": ("alignkit.stages.ppo", C.PPOConfig, "RLHF with PPO: actor, critic, reference, reward model; KL-shaped rewards, GAE"),
    "grpo": ("alignkit.stages.ppo", C.GRPOConfig, "GRPO: the ppo stage without a critic, group-normalised advantages, KL as a loss term"),
    "raft": ("alignkit.stages.raft", C.RAFTConfig, "reward-ranked fine-tuning: sample, keep the best by reward, fine-tune, repeat"),
    "best-of-n": ("alignkit.stages.best_of_n", C.BestOfNConfig, "best-of-n / rejection sampling: n samples per prompt, keep the highest reward"),
    "iterate": ("alignkit.stages.iterate", C.IterateConfig, "iterative RLHF: rounds of sample, select and label comparisons (simulated, gold, RM or LLM judge), refresh the reward model, policy round, eval"),
    "select": ("alignkit.stages.select", C.SelectConfig, "data selection: k-center coreset from task centres (Chen et al. 2023), random / k-means baselines, near-duplicate removal"),
    "eval": ("alignkit.stages.evaluate", C.EvalConfig, "evaluate models or checkpoints: gold/proxy reward, KL, win rate, diversity, alarms"),
    "pipeline": ("alignkit.stages.pipeline", C.PipelineConfig, "every stage end to end, then eval and a report"),
}

# Commands with their own flags (not a training stage): name -> (module with main(argv) -> int, description)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("alignkit.stages.score", "add a reward-model score to each record: --model RM --data FILE --out FILE"),
    "plan": ("alignkit.plan_cli", "cost planner: FLOPs, PF-days, GPU-hours, memory per GPU of a stage (nothing runs)"),
    "chat": ("alignkit.chat_cli", "talk to a model in its chat template, replies streamed: MODEL [--prompt TEXT] [--temperature T ...]"),
    "generate": ("alignkit.generate_cli", "sample responses to a prompts file: MODEL --data FILE --out FILE [--n N --batch-size B ...]"),
    "report": ("alignkit.report_cli", "rebuild report.html (and report.md) of a pipeline or eval run dir: RUN_DIR (no model runs)"),
}

USAGE = """usage: alignkit <stage> [--config FILE] [key=value | --key value | --key=value ...]
       alignkit <stage> --help
       alignkit data check FILE [--kind KIND] [--model MODEL] [--max-length N]
       alignkit plan tokens=D (params=N | model=NAME) [stage=STAGE] [gpus=8 gpu=h100 mfu=0.4 ...]

stages:
{stages}

Keys on the command line override the config file, as key=value or, as in HF and TRL, --key value /
--key=value (dashes for underscores: --max-steps 10); nested keys use dots (lora.r=8, --lora.r 8); a bare
bool flag is true (--packing).
"""


def _usage() -> str:
    width = max(len(n) for n in STAGES)
    lines = [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in STAGES.items()]
    lines.append(f"  {'data':<{width}}  data check: counts, token lengths, truncation, a rendered example")
    lines.extend(f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items())
    return USAGE.format(stages="\n".join(lines))


def stage_help(name: str) -> str:
    _, cls, desc = STAGES[name]
    out = [f"usage: alignkit {name} [--config FILE] [key=value | --key value | --key=value ...]", "", desc, "",
           "options (key: type = default; set as key=value, --key value or --key=value, dashes for underscores):"]
    rows = C.field_help(cls)
    groups = dict(C.groups_of(cls))
    for group in ["", *groups]:  # the stage's own keys, then one block per group (sampling.*, reward.*, lora.*)
        if group:
            out += ["", f"{group}.* ({groups[group]}):"]
        for key, tname, default, help_text in rows:
            if (key.split(".")[0] if "." in key else "") == group:
                out.append(f"  {key}: {tname} = {default!r}")
                out.extend(textwrap.wrap(help_text, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


# Bool spellings a bare flag may be followed by (config's rule for bool values); anything else is not its value.
_BOOL_WORDS = ("true", "false", "yes", "no")


def _is_flag(arg: str) -> bool:
    """True for '--key...' and '-c'-style switches; '-1' and '-.5' are values (a negative number)."""
    return arg.startswith("--") or (len(arg) >= 2 and arg[0] == "-" and arg[1].isalpha())


def _flag_key(flag: str) -> str:
    """'--max-steps' -> 'max_steps', '--lora.target-modules' -> 'lora.target_modules' (no key has a dash)."""
    key = flag[2:].replace("-", "_")
    if not key or key.startswith((".", "_")) or key.endswith("."):
        raise C.ConfigError(f"'{flag}' is not an option name: use --key value, --key=value or key=value")
    return key


def parse_stage_args(argv: list[str], cls: type | None = None) -> tuple[str | None, list[str]]:
    """(--config path or None, key=value overrides) from a stage's command line; anything else is an error.

    Besides `key=value`, options take the HF/TRL spellings `--key value` and `--key=value`, with dashes
    for underscores (`--max-steps 10`) and dots for nested keys (`--lora.r 8`). A bare `--flag`
    (followed by another flag or nothing) means `flag=true`. With the stage's config class `cls`, a
    bool field takes the next argument only when it is a bool word, so `--packing lr=1e-4` works, and a
    bare flag that is not a bool field is refused here, naming the flag; without `cls`, a bare flag is
    `flag=true` and load_config judges it. Values stay strings: load_config parses and checks them.
    """
    bools = {key for key, tname, _, _ in C.field_help(cls) if tname == "bool"} if cls else None
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--config", "-c"):
            if nxt is None or _is_flag(nxt):
                raise C.ConfigError(f"{arg} needs a file path")
            config_path = nxt
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        elif arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            overrides.append(f"{_flag_key(flag)}={value}")
        elif arg.startswith("--"):
            key = _flag_key(arg)
            is_bool = bools is None or key in bools
            takes_next = nxt is not None and not _is_flag(nxt) and (
                bools is None or not is_bool or nxt.lower() in _BOOL_WORDS)
            if takes_next:
                overrides.append(f"{key}={nxt}")
                i += 2
                continue
            if not is_bool:
                raise C.ConfigError(f"{arg} needs a value: {arg} VALUE, {arg}=VALUE or {key}=VALUE")
            overrides.append(f"{key}=true")
        else:
            raise C.ConfigError(f"unexpected argument '{arg}': use --config FILE and key=value or --key value options")
        i += 1
    return config_path, overrides


def run_stage(name: str, argv: list[str]) -> dict:
    module_name, cls, _ = STAGES[name]
    config_path, overrides = parse_stage_args(argv, cls)
    cfg = C.load_config(cls, config_path, overrides)
    return importlib.import_module(module_name).run(cfg)


def data_command(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="alignkit data")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="report on a data file as a stage would see it")
    check.add_argument("source", help="file path, dataset name or task:<name>/<part>")
    check.add_argument("--kind", default=None, help="text, sft, preference, ranked or prompts (default: detect)")
    check.add_argument("--model", default=None, help="model whose tokenizer to use (default: a BPE trained on the data)")
    check.add_argument("--max-length", type=int, default=256, help="tokens per sequence, as max_length in a stage")
    args = parser.parse_args(argv)
    from alignkit.data.check import format_data_check, run_data_check

    tokenizer = _tokenizer_for_check(args.source, args.kind, args.model)
    report = run_data_check(args.source, args.kind, tokenizer, args.max_length)
    print(format_data_check(report))
    return 0


def _tokenizer_for_check(source: str, kind: str | None, model: str | None):
    if model:
        from alignkit.models.loading import load_tokenizer, resolve_model_path

        return load_tokenizer(resolve_model_path(model))
    from alignkit.data.check import load_for_check
    from alignkit.models.tokenizer import train_bpe_tokenizer
    from alignkit.runtime.stage import record_texts

    # bad records are counted and shown by run_data_check, not a reason to stop before it
    records, _, _ = load_for_check(source, kind)
    return train_bpe_tokenizer(record_texts(records), vocab_size=1024)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    try:
        if name == "data":
            sys.exit(data_command(rest))
        if name in COMMANDS:
            sys.exit(importlib.import_module(COMMANDS[name][0]).main(rest))
        if name not in STAGES:
            import difflib

            close = difflib.get_close_matches(name, [*STAGES, *COMMANDS, "data"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            print(f"alignkit: unknown stage '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
            sys.exit(2)
        if any(a in ("-h", "--help") for a in rest):
            print(stage_help(name))
            return
        run_stage(name, rest)
    except SystemExit:  # a command's exit code: not an error, and _input_errors() would import torch
        raise
    except C.ConfigError as e:
        _undo_failed_start()
        print(f"alignkit {name}: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, sampling) or pressed twice
        print(f"alignkit {name}: interrupted; no checkpoint was written now (resume=true continues from the last one, "
              "if any)", file=sys.stderr)
        sys.exit(130)
    except _input_errors() as e:
        _undo_failed_start()
        print(f"alignkit {name}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    except _run_stopped() as e:  # interrupted with a checkpoint, non-finite steps, disk full: said in one line
        print(f"alignkit {name}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def _undo_failed_start() -> None:
    """A stage that failed on bad input leaves its output_dir as it found it (runtime.stage.undo_failed_start);
    nothing to do when no stage started (the module is then not even imported)."""
    stage = sys.modules.get("alignkit.runtime.stage")
    if stage is not None:
        stage.undo_failed_start()


def _run_stopped() -> type[BaseException]:
    guards = sys.modules.get("alignkit.runtime.guards")
    return guards.RunStopped if guards is not None else _NeverRaised


class _NeverRaised(Exception):
    """Stands in for RunStopped when no training loop was imported (so none can have raised it)."""


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input: print the message, not a traceback."""
    errors: list[type[BaseException]] = []
    for module, attr in (("alignkit.data.records", "DataError"), ("alignkit.models.loading", "ModelError")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors) or (C.ConfigError,)
