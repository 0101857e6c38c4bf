"""How every dvc.yaml command starts its stage: ``python -m latent_sft_core.launcher tasks.<stage> [options]``.

The launcher reads the ``launch`` section of the stage's params file (its ``--params``, else params.yaml) and
replaces itself with the stage's processes:

* one process on one node (the default), or a stage that always runs alone (data, tokenizer, chunking, model
  import, LoRA merge): ``python -m tasks.<stage> ...``, exactly what the command would be without a launcher;
* a distributed stage (``DISTRIBUTED_STAGES``) with several processes: ``torchrun`` (``python -m
  torch.distributed.run``; ``--standalone`` on one node) or the ``deepspeed`` launcher, which start
  ``launch.processes_per_node`` copies of the stage with RANK / WORLD_SIZE / LOCAL_RANK set.

So ``dvc repro``, ``dvc repro -s <stage>``, ``dvc exp run`` and the Prefect flow (which calls DVC) all start the
right number of processes, and nobody edits dvc.yaml. Batch sizes are global (``train.batch_size`` rows per
forward over all processes), so a training stage's batch size must divide evenly among the processes; the
launcher checks it before anything starts. The ``launch`` section is not a DVC param of the stages: how many
processes compute a stage does not change what it computes (up to floating-point reduction order, see
BENCHMARKS.md), as the number of dataloader workers does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from latent_sft_core.config import DEFAULT_PARAMS_PATH, LaunchParams, Params, ParamsError, load_params
from latent_sft_core.stage_cli import run_cli

log = logging.getLogger(__name__)

TRAINING_STAGES = ("base_model", "train_encoder", "train_decoder", "train_joint", "train_latent")
SHARDED_INFERENCE_STAGES = ("cache_soft_labels", "evaluate")
DISTRIBUTED_STAGES = frozenset(TRAINING_STAGES + SHARDED_INFERENCE_STAGES)
NODE_RANK_VARIABLE = "LATENT_SFT_NODE_RANK"
STAGE_PACKAGE = "tasks."


def stage_name(module: str) -> str:
    if not module.startswith(STAGE_PACKAGE) or len(module) == len(STAGE_PACKAGE):
        raise ParamsError(f"the launcher runs stage modules (tasks.<stage>), not {module!r}")
    return module[len(STAGE_PACKAGE):]


def node_rank(launch: LaunchParams, environment: dict[str, str]) -> int:
    """``launch.node_rank``, or ``LATENT_SFT_NODE_RANK`` when set (one params.yaml for every node)."""
    value = environment.get(NODE_RANK_VARIABLE)
    if value is None:
        return launch.node_rank
    if not value.isdigit() or int(value) >= launch.nodes:
        raise ParamsError(f"{NODE_RANK_VARIABLE}={value!r}: expected a node rank below launch.nodes ({launch.nodes})")
    return int(value)


def check_batch_sizes(params: Params, stage: str) -> None:
    """A training stage's ``train.batch_size`` must split evenly over the processes."""
    if stage not in TRAINING_STAGES:
        return
    batch_size, world_size = getattr(params, stage).train.batch_size, params.launch.world_size
    if batch_size % world_size:
        raise ParamsError(f"{stage}.train.batch_size={batch_size} does not divide among launch.processes_per_node x "
                          f"launch.nodes = {world_size} processes; make it a multiple of {world_size}")


def stage_command(
    launch: LaunchParams, module: str, argv: Sequence[str], python: str = sys.executable,
    environment: dict[str, str] | None = None,
) -> list[str]:
    """The command line that runs ``module`` (``tasks.<stage>``) with ``argv`` as ``launch`` says."""
    stage = stage_name(module)
    if stage not in DISTRIBUTED_STAGES or launch.world_size == 1:
        return [python, "-m", module, *argv]
    if launch.launcher == "deepspeed":
        command = [python, "-m", "deepspeed.launcher.runner", "--num_nodes", str(launch.nodes),
                   "--num_gpus", str(launch.processes_per_node),
                   "--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
        if launch.hostfile:
            command += ["--hostfile", launch.hostfile]
        # LOCAL_RANK reaches the stage through the environment, so its options stay those of one process
        return [*command, "--no_local_rank", "--module", module, *argv]
    return torchrun_command(launch, module, argv, python, environment)


def torchrun_command(
    launch: LaunchParams, module: str, argv: Sequence[str], python: str = sys.executable,
    environment: dict[str, str] | None = None,
) -> list[str]:
    """``torchrun`` starting ``launch.processes_per_node`` copies of ``python -m module argv`` on this node."""
    command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.processes_per_node)]
    if launch.nodes == 1:
        command.append("--standalone")  # a free port of this machine: concurrent runs do not collide
    else:
        rank = node_rank(launch, os.environ if environment is None else environment)
        command += ["--nnodes", str(launch.nodes), "--node_rank", str(rank), "--master_addr", launch.master_addr,
                    "--master_port", str(launch.master_port)]
    return [*command, "-m", module, *argv]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latent_sft_core.launcher", description=__doc__.split("\n")[0])
    parser.add_argument("module", help="the stage module, tasks.<stage>")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's own options")
    args = parser.parse_args(argv)
    params_option = argparse.ArgumentParser(add_help=False)
    params_option.add_argument("--params", default=DEFAULT_PARAMS_PATH)
    known, _ = params_option.parse_known_args(args.stage_args)
    stage = stage_name(args.module)
    params = load_params(known.params)
    check_batch_sizes(params, stage)
    command = stage_command(params.launch, args.module, args.stage_args)
    log.info("%s: %s", stage, shlex.join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(run_cli(main))
