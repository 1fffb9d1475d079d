"""Issue 12, generation: writer lock, no empty store on a dead scheduler, and the kill test
(many SIGKILLs, then resume; then damage, check --integrity and resume)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import zarr
from typer.testing import CliRunner

from simgen import store
from simgen.cli import app
from simgen.cluster import ClusterSpec
from simgen.generation import generate, stores_identical
from tests import test_generate

# the calibrated small config of test_generate (shared fixtures)
cache_dir = test_generate.cache_dir
small_cfg = test_generate.small_cfg
calibration = test_generate.calibration

runner = CliRunner()


def test_a_second_writer_is_told_who_holds_the_lock(small_cfg, calibration, tmp_path):
    out = tmp_path / "s.zarr"
    lock = store.lock_path(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        since = "2026-01-01T00:00:00+00:00"
        lock.write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": since})
        )
        other = small_cfg.with_overrides({"dataset.seed": 5})  # whatever its config
        for cfg in (small_cfg, other):
            with pytest.raises(
                store.LockedError, match=f"pid {holder.pid} on host .* since {re.escape(since)}"
            ):
                generate(
                    cfg, out, cluster=ClusterSpec("none"), calibration=calibration, progress=False
                )
        assert not out.exists()
        result = runner.invoke(app, ["generate", "-o", str(out), "--cluster", "none", "--n", "1"])
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and taken over
    report = generate(
        small_cfg, out, cluster=ClusterSpec("none"), calibration=calibration, progress=False
    )
    assert report.computed == small_cfg.dataset.n_samples
    assert not lock.exists()  # released


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "s.zarr"
    store.lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(store.LockedError, match="host elsewhere"), store.WriterLock(out):
        pass


def test_an_unreachable_scheduler_is_one_quick_line_and_leaves_no_store(small_cfg, tmp_path):
    out = tmp_path / "s.zarr"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(small_cfg.to_yaml())
    t0 = time.perf_counter()
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--scheduler", "tcp://127.0.0.1:1"]
    )
    assert result.exit_code == 1, result.output
    assert "tcp://127.0.0.1:1" in result.output and "Traceback" not in result.output
    assert time.perf_counter() - t0 < 25
    assert not out.exists() and not store.lock_path(out).exists()


def _done(out):
    try:
        return int(zarr.open_group(str(out), mode="r")["complete"][:].sum())
    except Exception:
        return 0


@pytest.mark.slow
def test_many_sigkills_then_resume_and_repair_give_the_uninterrupted_store(
    small_cfg,
    calibration,
    tmp_path,
    cache_dir,
):
    n = 640  # tasks of 8 small samples take ~0.1 s: enough of them for ten kills
    # tasks of 8: a kill loses at most the task in flight
    cfg = small_cfg.with_overrides({"dataset.n_samples": n, "dataset.samples_per_task": 8})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.to_yaml())
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "simgen", "generate", "-c", str(cfg_file), "-o", str(out)]
    cmd += ["--cluster", "none"]
    env = {**os.environ, "SIMGEN_CACHE": str(cache_dir)}
    rng = random.Random(12)
    kills = 0
    while kills < 10:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 5.0))
        if proc.poll() is not None:
            break  # finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 10, f"only {kills} kills before the store was done: use a larger n"
    assert _done(out) < n
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 0, result.output
    ref = tmp_path / "ref.zarr"
    generate(cfg, ref, cluster=ClusterSpec("none"), calibration=calibration, progress=False)
    assert stores_identical(out, ref)
    # damage two samples: a flipped bit (checksum) and a deleted chunk (reads as zeros)
    chunk = out / "images" / "c" / "5" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    (out / "masks" / "c" / "9" / "0" / "0").unlink()
    check = runner.invoke(app, ["check", "--integrity", str(out)])
    assert check.exit_code == 1, check.output
    assert "sample 5: damaged" in check.output and "sample 9: damaged" in check.output
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 0 and "2 samples computed" in result.output, result.output
    assert stores_identical(out, ref)
    assert runner.invoke(app, ["check", "--integrity", str(out)]).exit_code == 0
    # a chunk the 8 samples of a task share (a drawn parameter): all 8 damaged, recomputed
    assert store.samples_per_task(store.open_store(out)) == 8
    shared = out / "params" / "shot_lambda_counts" / "c" / "1"
    shared.write_bytes(b"garbage")
    check = runner.invoke(app, ["check", "--integrity", str(out)])
    assert check.exit_code == 1 and all(f"sample {i}: damaged" in check.output
                                        for i in range(8, 16)), check.output  # fmt: skip
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 0 and "8 samples computed" in result.output, result.output
    assert stores_identical(out, ref)


def test_yes_goes_on_beyond_the_limits(small_cfg, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(small_cfg.with_overrides({"dataset.n_samples": 1}).to_yaml())
    out = tmp_path / "s.zarr"
    args = ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    refused = runner.invoke(app, [*args, "--max-disk", "1kB"])
    assert refused.exit_code == 1 and "over the limit 1.0 kB" in refused.output
    assert not out.exists()
    result = runner.invoke(app, [*args, "--max-disk", "1kB", "--yes"])
    assert result.exit_code == 0 and "1 samples computed" in result.output, result.output


def test_ctrl_c_with_the_local_cluster_is_one_line_exit_130_and_resumable(
    small_cfg, calibration, tmp_path, cache_dir
):
    """A real Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends
    it) while two local Dask workers generate: one line, exit 130, no worker traceback, no
    process left, no lock left, and the store resumes to the uninterrupted one."""
    n = 24
    # one sample per task: the Ctrl-C lands while tasks are still pending
    cfg = small_cfg.with_overrides({"dataset.n_samples": n, "dataset.samples_per_task": 1})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.to_yaml())
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "simgen", "generate", "-c", str(cfg_file), "-o", str(out)]
    cmd += ["--cluster", "local", "--workers", "2"]
    env = {**os.environ, "SIMGEN_CACHE": str(cache_dir)}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while _done(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "finished (or failed) before the Ctrl-C: use a larger n"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0] and "resume" in errors[0], err
    gone = time.monotonic() + 20  # no worker outlives the command (zombies are reaped)
    while time.monotonic() < gone:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    assert not store.lock_path(out).exists()
    assert 0 < _done(out) < n
    result = runner.invoke(
        app, ["generate", "-c", str(cfg_file), "-o", str(out), "--cluster", "none"]
    )
    assert result.exit_code == 0, result.output
    ref = tmp_path / "ref.zarr"
    generate(cfg, ref, cluster=ClusterSpec("none"), calibration=calibration, progress=False)
    assert stores_identical(out, ref)
