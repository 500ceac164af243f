"""Distribution through accelerate and DeepSpeed: the DeepSpeed config a recipe asks for, and `psipo launch`.

psipo adds no distribution of its own. Under `accelerate launch` the Trainer (through accelerate) runs DDP or
DeepSpeed; a recipe's `distributed.strategy: zero2|zero3` hands the Trainer a DeepSpeed config, and `auto`
leaves the choice to the accelerate config file. Known traps, handled where they arise:
- PEFT + ZeRO-3 + gradient checkpointing needs reentrant checkpointing (TRL forces it);
- QLoRA + ZeRO-3 needs the 4-bit storage dtype to equal the compute dtype (`models.loading.quantization_config`);
- bf16 base + fp32 LoRA breaks ZeRO-3's all-gathers (TRL keeps adapters in the base dtype under ZeRO-3);
- ZeRO-3's zero.Init needs the process group and the DeepSpeed config alive before the model is built, so
  the training arguments are created first (`preference.build_preference_trainer`, `reward.build_reward_trainer`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from psipo_cli.errors import UserError
from psipo_cli.recipe.schema import DistributedSection, Recipe

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def launcher_zero_stage() -> int | None:
    """The ZeRO stage an `accelerate launch --config_file` with DeepSpeed set up, if it did."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")) or None


def deepspeed_config(dist: DistributedSection) -> dict[str, Any] | None:
    """The DeepSpeed config for TrainingArguments(deepspeed=...), or None to leave it to the launcher.

    One source of truth per launch: if the accelerate config already set DeepSpeed up, it wins, and a recipe
    asking for a different ZeRO stage is an error rather than a silent choice.
    """
    launched = launcher_zero_stage()
    if launched is not None:
        if dist.zero_stage not in (None, launched) or dist.deepspeed_config:
            raise UserError(
                f"the accelerate config already runs DeepSpeed ZeRO-{launched}; drop the recipe's DeepSpeed "
                "settings or launch without a DeepSpeed accelerate config",
                where="distributed",
            )
        return None
    if dist.deepspeed_config:
        path = Path(dist.deepspeed_config)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError("file not found", where=f"distributed.deepspeed_config ({path})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"not valid JSON ({err})", where=f"distributed.deepspeed_config ({path})") from None
    if dist.zero_stage is None:
        return None
    zero: dict[str, Any] = {"stage": dist.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the saved adapter is whole, not shards
    # "auto" values are filled in by transformers from the training arguments, so the two never disagree.
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def uses_deepspeed(dist: DistributedSection) -> bool:
    """Whether this launch trains under DeepSpeed (the recipe's or the accelerate config's)."""
    return launcher_zero_stage() is not None or deepspeed_config(dist) is not None


def single_process_rendezvous() -> None:
    """Let DeepSpeed run in a process no launcher started (`psipo finetune`, `psipo launch -n 1`): it needs the
    rendezvous variables a launcher sets, or it looks for MPI. A launched process has them already."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def prepare_zero3_init(args: Any) -> None:
    """Under ZeRO-3, bring deepspeed.comm up on the launcher's process group before the model is built.

    zero.Init (entered by from_pretrained) reads the world size from deepspeed.comm; if that is not initialised
    it sees a world of 1 and its batch-size check fails (seen on CPU with gloo).
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def max_over_processes(values: list[float], device: Any) -> list[float]:
    """Each value's maximum over all processes (the values themselves in a single process): how processes that
    each looked at their own data take one decision, so none is left waiting alone in a collective."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes), as torch.distributed sees them. Before the Trainer exists,
    accelerate's PartialState may disagree: on CPU under a multi-GPU accelerate config it brings the process group
    up yet reports one process (each its own main), until TrainingArguments sets the state up again."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def default_accelerate_config(num_processes: int) -> Path:
    """A plain process launcher: DeepSpeed, if any, is configured by the recipe itself (`deepspeed_config`)."""
    return ACCELERATE_CONFIGS / ("multi_gpu.yaml" if num_processes > 1 else "single_gpu.yaml")


def free_port() -> int:
    """A free TCP port on this machine for the rendezvous (each launch its own, so runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    recipe_path: Path,
    recipe: Recipe,
    overrides: list[str],
    num_processes: int,
    config: Path | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The `accelerate launch ... -m psipo_cli finetune RECIPE ...` command for this recipe."""
    if num_processes < 1:
        raise UserError("must be at least 1", where="--num-processes")
    config = config or default_accelerate_config(num_processes)
    if not config.is_file():
        raise UserError("accelerate config not found", where=str(config))
    precision = "bf16" if recipe.training.bf16 else "fp16" if recipe.training.fp16 else "no"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", str(num_processes), "--mixed_precision", precision]
    command += ["--main_process_port", str(port or free_port())]
    return [*command, "-m", "psipo_cli", "finetune", str(recipe_path), *overrides, *(extra or [])]
