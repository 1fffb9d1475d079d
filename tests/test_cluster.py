"""Batch-cluster settings and errors without a scheduler (the real SLURM run is
tests/test_cluster_slurm.py, through make test-cluster)."""

from __future__ import annotations

import os

import dask
import pytest
from typer.testing import CliRunner

from simgen.cli import ClusterKind, _parse_jobqueue, app
from simgen.cluster import JOB_DEFAULTS, ClusterSpec, _command_error, _start_cluster, job_settings

SBATCH_STDERR = (
    "sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
)


def test_config_file_settings_are_not_overridden_by_our_defaults():
    with dask.config.set({"jobqueue.slurm.memory": "32GB", "jobqueue.slurm.cores": None}):
        kwargs = job_settings(ClusterSpec("slurm"))
        assert "memory" not in kwargs  # dask-jobqueue takes 32GB from the config
        assert kwargs["cores"] == JOB_DEFAULTS["cores"]
        cli = job_settings(ClusterSpec("slurm", jobqueue={"memory": "4GB", "queue": "short"}))
        assert cli["memory"] == "4GB" and cli["queue"] == "short"


def test_workers_get_malloc_settings_that_keep_temporaries_on_the_heap():
    """distributed's MALLOC_TRIM_THRESHOLD_=65536 made every image-sized temporary a fresh
    mmap (~1.7x the CPU time per sample): local workers and batch jobs get WORKER_MALLOC_ENV,
    a job prologue the user configured is left alone."""
    from simgen.cluster import WORKER_MALLOC_ENV, open_client

    with open_client(ClusterSpec("local", workers=1)) as client:
        (env,) = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}).values()
    assert env == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
    prologue = job_settings(ClusterSpec("slurm"))["job_script_prologue"]
    assert prologue == [f"export {k}=${{{k}:-{v}}}" for k, v in WORKER_MALLOC_ENV.items()]
    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load x"]}):
        assert "job_script_prologue" not in job_settings(ClusterSpec("slurm"))


def test_jobqueue_options_parse_to_dask_jobqueue_keywords():
    job = _parse_jobqueue(
        ["partition=short", "walltime=30:00", "job-extra-directives=[--gres=gpu:1]", "cores=4"],
        ClusterKind.slurm,
    )
    assert job == {
        "queue": "short",
        "walltime": "30:00",  # not YAML's sexagesimal 1800
        "job_extra_directives": ["--gres=gpu:1"],
        "cores": 4,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "none", "--jobqueue", "queue=short"], "--jobqueue applies to --cluster"),
        (["--cluster", "slurm", "--jobqueue", "short"], "--jobqueue expects KEY=VALUE"),
    ],
)
def test_jobqueue_option_errors_are_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["generate", "-o", str(tmp_path / "x.zarr"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_sbatch_stderr_becomes_one_line():
    err = RuntimeError(
        "Command exited with non-zero exit code.\nExit code: 1\nCommand:\nsbatch /tmp/j.sh\n"
        f"stdout:\n\nstderr:\n{SBATCH_STDERR}\n"
    )
    assert _command_error(err) == (
        "invalid partition specified: nope; "
        "Batch job submission failed: Invalid partition name specified"
    )


def test_refused_job_raises_instead_of_waiting(tmp_path, monkeypatch):
    """A refused sbatch is an error at once (it used to be logged while the client waited
    for workers forever)."""
    pytest.importorskip("dask_jobqueue")
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!/bin/sh\nprintf '{SBATCH_STDERR}' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    spec = ClusterSpec(
        "slurm",
        workers=2,
        jobqueue={"queue": "nope", "interface": "lo", "log_directory": str(tmp_path)},
    )
    with pytest.raises(RuntimeError, match="sbatch refused the worker job") as info:
        _start_cluster(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "invalid partition specified: nope" in message and "'nope'" in message


def test_in_process_work_gets_the_workers_malloc_thresholds(monkeypatch):
    import ctypes.util

    from simgen.cluster import tune_malloc_in_process

    if ctypes.util.find_library("c") is None:
        pytest.skip("no C library to tune")
    calls = []

    class FakeLibc:
        def mallopt(self, code, value):
            calls.append((code, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "12345")  # the user's setting wins
    assert tune_malloc_in_process()
    assert calls == [(-1, 1 << 28)]
