"""Shared test set-up: every test runs offline, without analytics; the micro pipeline and a Prefect API are
started once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: without it they are skipped, never failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """Raw data, tokenizer, chunks and a CoT-SFT base model for the micro configuration (built once).

    Returns (root folder, params, base-model metrics); the folder holds raw/, pretrained/, tokenizer/, chunked/,
    base/.
    """
    from latent_sft_core.base_model import train_base_model
    from latent_sft_core.chunking import chunk_dataset
    from latent_sft_core.config import parse_params
    from latent_sft_core.data.prepare import prepare_data
    from latent_sft_core.model_import import import_model
    from latent_sft_core.text import build_tokenizer
    from tests.support import MICRO_PARAMS

    root = tmp_path_factory.mktemp("micro")
    params = parse_params(MICRO_PARAMS)
    prepare_data(params, root / "raw")
    import_model(params.base.model, root / "pretrained")
    build_tokenizer(params, root / "raw", root / "tokenizer", root / "pretrained")
    chunk_dataset(params, root / "raw", root / "tokenizer", root / "chunked", root / "metrics" / "chunk.json")
    metrics = train_base_model(
        params, root / "raw", root / "tokenizer", root / "base", root / "metrics" / "base_model.json",
        root / "plots" / "loss.csv", scratch_dir=root / "scratch", pretrained_dir=root / "pretrained",
    )
    return root, params, metrics


@pytest.fixture(scope="session")
def phase1_run(micro_run):
    """The three phase-1 trainings and the merge, in order, on the micro configuration.

    Returns (root, params, metrics per stage); adds train_encoder/, train_decoder/, train_joint/, merged/.
    """
    from latent_sft_core.phase1_training import merge_stage1, train_stage1
    from tests.support import STAGE1_STAGES, stage1_inputs

    root, params, _ = micro_run
    metrics = {}
    for stage in STAGE1_STAGES:
        metrics[stage] = train_stage1(params, stage, stage1_inputs(root, stage), root / stage,
                                      root / "metrics" / f"{stage}.json", root / "plots" / f"{stage}.csv",
                                      scratch_dir=root / "scratch" / stage)
    merge_stage1(root / "base", root / "train_encoder", root / "train_decoder", root / "train_joint", root / "merged")
    return root, params, metrics


@pytest.fixture(scope="session")
def labelled_run(phase1_run):
    """The soft-label cache of the micro phase-1 run. Returns (root, params, cache metrics); adds labels/."""
    from latent_sft_core.soft_label_caching import cache_soft_labels

    root, params, _ = phase1_run
    metrics = cache_soft_labels(params, root / "merged", root / "chunked", root / "labels",
                                root / "metrics" / "cache.json")
    return root, params, metrics


@pytest.fixture(scope="session")
def latent_run(labelled_run):
    """A stage-2 model of the micro run, trained in this process without DeepSpeed. Returns (root, params);
    adds latent/."""
    from latent_sft_core.config import parse_params
    from latent_sft_core.phase2_training import train_latent
    from tests.support import deep_merge

    root, params, _ = labelled_run
    plain = parse_params(deep_merge(params.model_dump(mode="json"), {"train_latent": {"deepspeed": {"enabled": False}}}))
    train_latent(plain, root / "merged", root / "chunked", root / "labels", root / "latent",
                 root / "metrics" / "train_latent.json", root / "plots" / "train_latent.csv",
                 scratch_dir=root / "scratch" / "train_latent")
    return root, params


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API (SQLite) and Prefect home for the session: flows called in tests run against it."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}):
        # the server starts in ~12 s alone; leave room for a busy machine
        with prefect_test_harness(server_startup_timeout=120):
            yield
