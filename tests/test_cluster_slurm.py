"""`simgen generate --cluster slurm` against a real SLURM scheduler (``make test-cluster``).

tests/slurm/with_slurm.sh starts a single-node SLURM for the run and exports SLURM_CONF and
SIMGEN_SLURM_PARTITION; without them these tests skip. The job settings come from a dask
config file (DASK_CONFIG, as ``~/.config/dask/jobqueue.yaml`` would on a real cluster) and
``--jobqueue`` options, and are checked in what ``squeue`` reports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simgen import store
from simgen.generation import stores_identical

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None,
        reason="needs a running SLURM: make test-cluster",
    ),
]

PARTITION = os.environ.get("SIMGEN_SLURM_PARTITION", "simgen")
# 48 samples at 128 px: ~0.5 s each here, long enough to cancel a job mid-run
ARGS = ["--n", "48", "--size", "128", "--model", "incoherent", "--device", "cpu"]
RATES: dict[str, float] = {}
TIMEOUT_S = 300  # one generate run; a hang fails the test instead of blocking CI
JOB_SETTINGS = {
    "cores": 1,
    "memory": "1GB",
    "walltime": "00:10:00",
    "interface": "lo",  # scheduler and workers on loopback only
    "scheduler-options": {"dashboard_address": None},
}


def _dask_config(folder: Path, logs: Path, **slurm) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "jobqueue": {"slurm": {**JOB_SETTINGS, "log-directory": str(logs), **slurm}},
        # forget a cancelled worker after 2 s (15 s by default) so its replacement is quick
        "distributed": {"deploy": {"lost-worker-timeout": "2s"}},
    }
    (folder / "jobqueue.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(folder, environment) of the runs: calibration cache, dask config with the partition."""
    root = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    env["SIMGEN_CACHE"] = str(root / "cache")
    env["DASK_CONFIG"] = str(_dask_config(root / "dask", root / "logs", queue=PARTITION))
    return root, env


def _generate(out, env, cwd, *extra, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simgen", "generate", "-o", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(work):
    """The in-process store (``--cluster none``) every cluster store must equal."""
    root, env = work
    done = _generate(root / "none.zarr", env, root, "--cluster", "none")
    assert done.returncode == 0, done.stderr
    RATES["none"] = _rate(done.stdout)
    return root / "none.zarr"


def _rate(stdout: str) -> float:
    return float(re.search(r"([0-9.]+) samples/s", stdout).group(1))


def _squeue() -> list[dict]:
    out = subprocess.run(
        ["squeue", "-h", "-n", "dask-worker", "-o", "%i|%P|%T|%C|%m|%l"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    keys = ("id", "partition", "state", "cpus", "memory", "time_limit")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.split()]


def _sacct(job_ids) -> str:
    """Finished jobs from the job-completion log (this test cluster keeps no database)."""
    ids = ",".join(sorted(job_ids, key=int))
    return subprocess.run(
        ["sacct", "-c", "-j", ids, "-o", "JobID,JobName,Partition,NodeList,State,End"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def _complete(path: Path) -> int:
    try:
        root = store.open_store(path)
        return root["complete"].shape[0] - len(store.pending_indices(root))
    except (store.StoreError, KeyError, FileNotFoundError):
        return 0


def _watch(proc: subprocess.Popen, out: Path, on_poll=None, timeout=TIMEOUT_S):
    """Poll squeue until ``proc`` ends; return ({job id: last squeue row}, stdout, stderr)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"simgen generate did not finish within {timeout} s; jobs {seen}")
        rows = _squeue()
        seen.update({row["id"]: row for row in rows})
        if on_poll is not None:
            on_poll(rows, _complete(out))
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    return seen, stdout, stderr


def _report(capsys, title: str, lines) -> None:
    with capsys.disabled():
        print(f"\n--- {title}")
        for line in lines:
            print(f"    {line}")


def test_slurm_store_identical_to_in_process_and_local(work, reference, capsys):
    root, env = work
    out = root / "slurm.zarr"
    cmd = [sys.executable, "-m", "simgen", "generate", "-o", str(out), *ARGS]
    proc = subprocess.Popen(
        [*cmd, "--cluster", "slurm", "--workers", "2"],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    jobs, stdout, stderr = _watch(proc, out)
    assert proc.returncode == 0, stderr
    assert stores_identical(reference, out)

    # two worker jobs, with the settings of the config file
    assert len(jobs) == 2, jobs
    for job in jobs.values():
        assert job["partition"] == PARTITION
        assert job["cpus"] == "1"
        assert job["memory"] == "954M"  # 1GB = 10^9 bytes, as dask-jobqueue requests it
        assert job["time_limit"] == "10:00"
    accounted = _sacct(jobs)
    assert all(job_id in accounted for job_id in jobs), accounted

    local = _generate(root / "local.zarr", env, root, "--cluster", "local", "--workers", "2")
    assert local.returncode == 0, local.stderr
    assert stores_identical(reference, root / "local.zarr")
    _report(
        capsys,
        "worker jobs seen by squeue (id partition state cpus memory time limit), then sacct",
        [" ".join(j.values()) for j in jobs.values()] + accounted.splitlines(),
    )
    _report(
        capsys,
        "48 samples of 128x128 px, 2 workers, wall time including cluster start-up",
        [
            f"slurm: {_rate(stdout):.2f} samples/s",
            f"local: {_rate(local.stdout):.2f} samples/s",
            f"none:  {RATES['none']:.2f} samples/s (in-process reference)",
        ],
    )


def test_cancelled_worker_job_loses_nothing(work, reference, capsys):
    """scancel one of two worker jobs mid-run: its tasks go to the other worker, a
    replacement job is submitted, and the store is the in-process one."""
    root, env = work
    out = root / "cancelled.zarr"
    cmd = [sys.executable, "-m", "simgen", "generate", "-o", str(out), *ARGS]
    # the CLI overrides the config file's walltime (squeue shows 20:00, not 10:00)
    cmd += ["--cluster", "slurm", "--workers", "2", "--jobqueue", "walltime=00:20:00"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cancelled: list[str] = []
    first: list[str] = []  # the two jobs running when one was cancelled
    at: list[int] = []

    def cancel_once(rows, complete):
        running = [r["id"] for r in rows if r["state"] == "RUNNING"]
        if not cancelled and len(running) == 2 and complete >= 6:
            subprocess.run(["scancel", running[0]], check=True, timeout=30)
            cancelled.append(running[0])
            first.extend(running)
            at.append(complete)

    jobs, stdout, stderr = _watch(proc, out, on_poll=cancel_once)
    assert cancelled, f"the run ended before a job could be cancelled; jobs {jobs}"
    assert proc.returncode == 0, stderr
    assert stores_identical(reference, out)
    assert {j["time_limit"] for j in jobs.values()} == {"20:00"}
    replacements = sorted(set(jobs) - set(first), key=int)
    assert replacements, f"no replacement job was submitted; jobs {jobs}"
    accounted = _sacct(jobs)
    assert re.search(rf"^{cancelled[0]}\s.*CANCELLED", accounted, re.M), accounted
    _report(
        capsys,
        f"scancel {cancelled[0]} at {at[0]}/48 samples; replacement job(s) {replacements}; "
        "store identical to --cluster none",
        accounted.splitlines(),
    )


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("wrong", "invalid partition specified: nope"),
        ("missing", "No partition specified"),
    ],
)
def test_bad_partition_is_one_clear_line(work, setting, expected, tmp_path):
    root, env = work
    env = dict(env)
    extra = ["--cluster", "slurm", "--workers", "2"]
    if setting == "wrong":
        extra += ["--jobqueue", "partition=nope"]
    else:  # a config file without a queue, on a cluster without a default partition
        env["DASK_CONFIG"] = str(_dask_config(tmp_path / "dask", tmp_path / "logs"))
    t0 = time.monotonic()
    done = _generate(tmp_path / "bad.zarr", env, tmp_path, *extra, timeout=120)
    assert done.returncode != 0
    # one error line (the progress bar's 0 % line, printed before the cluster starts, aside)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "sample/s]" not in ln]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: slurm: sbatch refused the worker job: ")
    assert expected in lines[0]
    assert time.monotonic() - t0 < 120
    assert not _squeue(), "a refused run left worker jobs behind"
