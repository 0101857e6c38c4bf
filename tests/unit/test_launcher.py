"""The launcher's command lines, as text: one process, several processes, several nodes, both launchers."""

from __future__ import annotations

import pytest

from latent_sft_core.config import LaunchParams, ParamsError, parse_params
from latent_sft_core.distributed import World, gathered_in_order, on_cpu, partitioned, whole_parameters
from latent_sft_core.launcher import DISTRIBUTED_STAGES, check_batch_sizes, main, stage_command

pytestmark = pytest.mark.unit

PY = "/env/bin/python"
ARGS = ["--params", "p.yaml", "--out", "models/base"]


def command(launch: dict, module: str = "tasks.base_model", environment: dict | None = None) -> str:
    return " ".join(stage_command(LaunchParams(**launch), module, ARGS, python=PY, environment=environment or {}))


def test_one_process_runs_the_stage_as_it_is():
    assert command({}) == "/env/bin/python -m tasks.base_model --params p.yaml --out models/base"


def test_stages_that_always_run_alone_ignore_the_process_count():
    for stage in ("prepare_data", "import_model", "tokenizer", "chunk", "merge_lora"):
        assert stage not in DISTRIBUTED_STAGES
        assert command({"processes_per_node": 8}, f"tasks.{stage}") == f"{PY} -m tasks.{stage} {' '.join(ARGS)}"


def test_torchrun_on_one_node_is_standalone():
    assert command({"processes_per_node": 4}, "tasks.evaluate") == (
        f"{PY} -m torch.distributed.run --nproc_per_node 4 --standalone -m tasks.evaluate {' '.join(ARGS)}")


def test_torchrun_on_several_nodes_names_the_rendezvous():
    launch = {"processes_per_node": 8, "nodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29600}
    expected = (f"{PY} -m torch.distributed.run --nproc_per_node 8 --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 "
                f"--master_port 29600 -m tasks.train_joint {' '.join(ARGS)}")
    assert command(launch, "tasks.train_joint") == expected
    # one params.yaml for every node: the environment says which node this is
    assert "--node_rank 0 " in command(launch, "tasks.train_joint", {"LATENT_SFT_NODE_RANK": "0"})
    with pytest.raises(ParamsError, match="LATENT_SFT_NODE_RANK='2'.*below launch.nodes \\(2\\)"):
        command(launch, "tasks.train_joint", {"LATENT_SFT_NODE_RANK": "2"})


def test_deepspeed_launcher_with_a_hostfile():
    launch = {"launcher": "deepspeed", "processes_per_node": 8, "nodes": 4, "master_addr": "node0",
              "hostfile": "/etc/hosts.ds"}
    assert command(launch, "tasks.train_latent") == (
        f"{PY} -m deepspeed.launcher.runner --num_nodes 4 --num_gpus 8 --master_addr node0 --master_port 29500 "
        f"--hostfile /etc/hosts.ds --no_local_rank --module tasks.train_latent {' '.join(ARGS)}")


def test_launch_params_refuse_what_cannot_start():
    with pytest.raises(ValueError, match="hostfile is required"):
        LaunchParams(launcher="deepspeed", nodes=2, master_addr="node0")
    with pytest.raises(ValueError, match="master_addr must be the address of node 0"):
        LaunchParams(nodes=2)
    with pytest.raises(ValueError, match="node_rank 2 must be below nodes"):
        LaunchParams(nodes=2, node_rank=2, master_addr="node0")
    with pytest.raises(ParamsError, match="launch.processes_per_node: Input should be greater than or equal to 1"):
        parse_params({"launch": {"processes_per_node": 0}})


def test_a_training_batch_must_divide_among_the_processes():
    params = parse_params({"launch": {"processes_per_node": 3}, "base_model": {"train": {"batch_size": 64}}})
    with pytest.raises(ParamsError, match=r"base_model\.train\.batch_size=64 does not divide among .* = 3 processes"):
        check_batch_sizes(params, "base_model")
    check_batch_sizes(params, "evaluate")  # decoding batches are dealt whole; any size works
    check_batch_sizes(parse_params({"launch": {"processes_per_node": 4}}), "train_latent")


def test_the_launcher_refuses_a_module_that_is_not_a_stage(tmp_path):
    (tmp_path / "p.yaml").write_text("{}")
    with pytest.raises(ParamsError, match="runs stage modules"):
        main(["os", "--params", str(tmp_path / "p.yaml")])


def test_alone_every_item_is_computed_here_in_order():
    assert World.from_environment() == World(0, 1, 0)
    seen = []
    results = list(gathered_in_order([3, 1, 2], lambda item: seen.append(item) or item * 10))
    assert results == [(3, 30), (1, 10), (2, 20)] and seen == [3, 1, 2]


def test_only_zero3_partitioned_parameters_are_gathered():
    import torch

    plain, sharded = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.empty(0))
    sharded.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert partitioned([plain, sharded]) == [sharded] and partitioned([plain]) == []
    with whole_parameters([plain]):  # nothing partitioned: nothing to gather, the values stay
        assert torch.equal(plain, torch.ones(3))


def test_results_come_back_on_the_cpu():
    from dataclasses import dataclass

    import torch

    @dataclass(frozen=True)
    class Holder:
        values: torch.Tensor
        items: list

    moved = on_cpu(Holder(torch.ones(2), [torch.zeros(1), {"a": torch.ones(1)}, "text"]))
    assert moved.values.device.type == "cpu" and moved.items[2] == "text"
    assert torch.equal(moved.items[1]["a"], torch.ones(1))


def test_a_stage_closes_the_process_group_it_leaves_open(tmp_path):
    """The Trainer opens the group of a training stage and never closes it; left to interpreter exit, gloo's
    threads can abort a finished process. run_cli closes it after the stage's work, and only then."""
    import torch.distributed as dist

    from latent_sft_core.stage_cli import run_cli

    open_during_stage = []

    def stage(argv):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        open_during_stage.append(dist.is_initialized())

    assert run_cli(stage, []) == 0
    assert open_during_stage == [True] and not dist.is_initialized()


def test_a_finished_process_of_a_distributed_stage_ends_without_teardown(monkeypatch):
    """Under several processes a finished stage process exits at once with status 0 (``os._exit``: no interpreter
    teardown to abort it); alone, run_cli returns its status as before; a failed stage is never ended early."""
    from latent_sft_core import stage_cli
    from latent_sft_core.errors import PipelineError

    exits = []
    monkeypatch.setattr(stage_cli.os, "_exit", exits.append)
    assert stage_cli.run_cli(lambda argv: None, []) == 0 and exits == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    stage_cli.run_cli(lambda argv: None, [])
    assert exits == [0]

    def failing(argv):
        raise PipelineError("bad row")

    assert stage_cli.run_cli(failing, []) == 2 and exits == [0]
