"""A build lock left by a killed DeepSpeed op build must not make train_latent wait forever."""

import logging
import os

from latent_sft_core.distributed import STALE_BUILD_LOCK_SECONDS, clear_stale_build_locks, extension_build_locks


def _lock(path, age_seconds, now):
    path.parent.mkdir(parents=True)
    path.touch()
    os.utime(path, (now - age_seconds, now - age_seconds))
    return path


def test_stale_locks_are_removed_and_live_ones_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    now = 1_000_000.0
    stale = _lock(tmp_path / "deepspeed_shm_comm" / "lock", STALE_BUILD_LOCK_SECONDS + 60, now)
    stale_nested = _lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", 10 * STALE_BUILD_LOCK_SECONDS, now)
    live = _lock(tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", 30, now)
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.touch()
    assert extension_build_locks() == sorted([stale, stale_nested, live])

    with caplog.at_level(logging.WARNING, logger="latent_sft_core.distributed"):
        clear_stale_build_locks(now=now)

    assert not stale.exists() and not stale_nested.exists()
    assert live.exists() and built.exists()
    assert extension_build_locks() == [live]
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert sorted(removed) == sorted(f"removed {p}: a torch extension build lock {age} min old, left by a killed build"
                                     for p, age in ((stale, 31), (stale_nested, 300)))
    assert any(str(live) in r.getMessage() and "delete the file" in r.getMessage() for r in caplog.records)


def test_no_extension_root_is_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "never-built"))
    assert extension_build_locks() == []
    clear_stale_build_locks()
