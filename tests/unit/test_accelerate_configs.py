"""configs/accelerate/*.yaml: each goes through accelerate launch's own parsing (config file -> launch arguments
-> the environment the processes get) and yields the plugin alignkit expects; the DeepSpeed ones also pass
DeepSpeed's own config parser (deepspeed is the optional `deepspeed` extra; skipped without it)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from tests.helpers import REPO

CONFIGS = REPO / "configs" / "accelerate"
NAMES = ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"]


def launch_env(name: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file configs/accelerate/NAME.yaml --num_processes 2 -m alignkit sft`
    decides: its parsed arguments, and the environment it starts the processes with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "2", "-m", "alignkit", "sft"])
    args, defaults, _ = _validate_launch_command(args)
    # launch_command sets this before choosing the DeepSpeed launcher
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys()) if defaults else []
    env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_the_shipped_set():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_as_accelerate_reads_it(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    loaded = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown top-level keys
    assert loaded.distributed_type == raw["distributed_type"]
    # not a CPU-only config: `use_cpu` would start one plain process; on a machine without GPUs the
    # multi-GPU launcher starts CPU processes that alignkit joins into a gloo group
    assert raw["use_cpu"] is False and raw["num_machines"] == 1
    assert raw["mixed_precision"] == "no"  # alignkit sets precision per stage (mixed_precision=...)
    args, env = launch_env(name)
    assert args.num_processes == 2 and not args.cpu
    assert (args.use_fsdp, args.use_deepspeed) == (name == "fsdp", name.startswith("zero"))


def test_fsdp_config_is_fsdp2_full_shard(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each process
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full shard
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"  # checkpoints per process; final/ is gathered
    assert plugin.cpu_ram_efficient_loading is False  # frozen models are loaded outside prepare()
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's "no offload" (CPUOffloadPolicy when on)


@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, "none"), ("zero3", 3, "none"), ("zero3_offload", 3, "cpu")])
def test_zero_configs_pass_deepspeeds_parser(monkeypatch, name: str, stage: int, offload: str):
    from accelerate.utils import DeepSpeedPlugin

    _, env = launch_env(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ds = DeepSpeedPlugin().deepspeed_config  # what accelerate hands DeepSpeed, batch sizes still "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
    assert ds["gradient_accumulation_steps"] == 1  # one alignkit micro-batch per step (see the config's comment)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # final/ from gathered weights
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]'): DeepSpeed's parser not run")
    from deepspeed.runtime.config import DeepSpeedConfig

    # accelerate fills the "auto" batch sizes at prepare(): micro-batch per GPU x accumulation x processes (1 here)
    filled = {**ds, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 4}
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 1.0 and parsed.gradient_accumulation_steps == 1
    assert parsed.zero_config.offload_optimizer.device == parsed.zero_config.offload_param.device == offload
