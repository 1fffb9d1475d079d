"""Dask clusters for dataset generation: in-process, local, an existing scheduler,
SLURM/PBS through dask-jobqueue, or one worker per GPU through dask-cuda.

Tasks are whole samples; the task graph never changes with the worker count, and sample i
depends only on (seed, i), so 1, 2 or 200 workers write bit-identical stores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CLUSTERS = ("local", "slurm", "pbs", "cuda", "none")
#: Seconds to wait for a running scheduler (``--scheduler``) to answer.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ClusterSpec:
    """Where generation tasks run.

    Parameters
    ----------
    kind : {"local", "slurm", "pbs", "cuda", "none"}
        ``local``: a ``LocalCluster`` of processes on this machine; ``slurm``/``pbs``: batch
        jobs through ``dask-jobqueue``; ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker
        per visible GPU; ``none``: run in this process, one sample after another.
    workers : int, optional
        Local worker processes (default: the machine's cores), or batch jobs to start.
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler to join instead (``tcp://...``).
    jobqueue : dict
        Keyword arguments for ``SLURMCluster``/``PBSCluster`` (``queue``, ``account``,
        ``cores``, ``memory``, ``walltime``, ``job_extra_directives``...). Settings in
        ``~/.config/dask/jobqueue.yaml`` apply as usual.
    quiet : bool
        Keep dask.distributed's INFO logs (worker start/stop) off the terminal.
    """

    kind: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    jobqueue: dict = field(default_factory=dict)
    quiet: bool = True

    def __post_init__(self):
        if self.kind not in CLUSTERS:
            raise ValueError(f"cluster: expected one of {CLUSTERS}, got {self.kind!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: expected >= 1, got {self.workers}")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[object | None]:
    """Yield a ``distributed.Client`` for ``spec`` (None for ``kind="none"``), closing
    whatever was started here on exit."""
    if spec.kind == "none" and spec.scheduler is None:
        yield None
        return
    from distributed import Client

    if spec.scheduler is not None:
        try:
            client = Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as err:
            raise RuntimeError(
                f"--scheduler {spec.scheduler}: no dask scheduler answered within "
                f"{CONNECT_TIMEOUT_S:g} s ({type(err).__name__})"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    with _sigint_blocked() if spec.kind in ("local", "cuda") else contextlib.nullcontext():
        cluster = _start_cluster(spec)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def _sigint_blocked():
    """Ignore SIGINT in this process while a local cluster starts.

    A Ctrl-C in a terminal goes to every process of the foreground group: to each worker
    too, which then dies with a traceback. Worker processes started while SIGINT is ignored
    inherit that (and Python keeps an ignored SIGINT ignored), so Ctrl-C reaches only this
    process: one line, the cluster closed, the store resumable. Workers a nanny restarts
    later ignore it through :func:`dask_setup`. A Ctrl-C during the start itself (a few
    seconds) is ignored; press it again.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def dask_setup(worker) -> None:
    """Worker preload (``preload=["simgen.cluster"]``): the worker ignores SIGINT, so only
    the process that runs ``simgen generate`` handles Ctrl-C."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread of the worker process: nothing to do
        pass


def _quiet_distributed_logs() -> None:
    """Keep dask.distributed's per-worker INFO lines off the terminal unless the user
    asked for verbose logs (its loggers set their own levels on import)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)


#: glibc malloc settings of the worker processes. distributed's nanny sets
#: ``MALLOC_TRIM_THRESHOLD_=65536`` (to return memory to the OS early), which also turns
#: off glibc's adaptive mmap threshold: every image-sized temporary was then a fresh
#: ``mmap`` with its pages faulted in, and a 512² sample cost ~1.7× the CPU time
#: (1.7–2.0 against 2.8–3.4 samples/s per core, benchmarks/bench_generate.py). These keep
#: temporaries up to 256 MB on the heap and at most 256 MB of freed heap per worker.
#: An environment variable set by the user wins (distributed's precedence).
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 1 << 28, "MALLOC_MMAP_THRESHOLD_": 1 << 28}


def tune_malloc_in_process() -> bool:
    """Give this process :data:`WORKER_MALLOC_ENV`'s thresholds through glibc's
    ``mallopt`` (for work done in the calling process: ``--cluster none``, benchmarks).

    Variables the user set in the environment win, as for workers. Returns False where
    glibc is not the allocator (nothing changed)."""
    import ctypes
    import ctypes.util
    import os

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    codes = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_TRIM/M_MMAP
    for var, value in WORKER_MALLOC_ENV.items():
        if var not in os.environ:
            mallopt(codes[var], int(value))
    return True


def _worker_environ():
    """Dask config that gives spawned workers :data:`WORKER_MALLOC_ENV`."""
    import dask

    key = "distributed.nanny.pre-spawn-environ"
    return dask.config.set({key: {**dask.config.get(key, default={}), **WORKER_MALLOC_ENV}})


def _start_cluster(spec: ClusterSpec):
    import distributed  # noqa: F401  (creates its loggers, which we then quiet)

    if spec.quiet:
        _quiet_distributed_logs()
    if spec.kind == "local":
        from distributed import LocalCluster

        n = spec.workers or default_workers()
        with _worker_environ():
            return LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: never "8787 is already in use"
                silence_logs=logging.ERROR,
                preload=["simgen.cluster"],  # workers ignore Ctrl-C (dask_setup)
            )
    if spec.kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise RuntimeError("cluster 'cuda' needs dask-cuda: pip install -e .[gpu]") from None
        with _worker_environ():
            return LocalCUDACluster(threads_per_worker=1, dashboard_address=None)
    return _start_jobqueue(spec)


#: Per-job settings used where neither ``jobqueue.yaml`` nor ``--jobqueue`` sets them.
JOB_DEFAULTS = {"cores": 1, "processes": 1, "memory": "8GB"}
#: How often lost jobs are replaced (a lost worker is forgotten after dask's
#: ``distributed.deploy.lost-worker-timeout``, 15 s by default).
KEEP_JOBS_EVERY_S = 10.0


def _start_jobqueue(spec: ClusterSpec):
    """SLURM/PBS through dask-jobqueue: submit ``spec.workers`` jobs now (a refused job is a
    one-line error, not a scheduler waiting forever) and keep that many jobs alive."""
    import dask

    try:
        import dask_jobqueue
    except ImportError:
        raise RuntimeError(
            f"cluster {spec.kind!r} needs dask-jobqueue: pip install -e .[cluster]"
        ) from None
    cls = dask_jobqueue.SLURMCluster if spec.kind == "slurm" else dask_jobqueue.PBSCluster
    kwargs = job_settings(spec)
    try:
        with warnings.catch_warnings():
            # the dashboard moves to a free port when 8787 is taken (another cluster on the
            # login node): say so in the log, not as a multi-line warning before the output
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{spec.kind} job settings: {str(err).splitlines()[0]}") from None
    jobs = spec.workers or 1
    try:
        cluster.sync(_submit, cluster, jobs)
    except RuntimeError as err:
        queue = kwargs.get("queue") or dask.config.get(f"jobqueue.{spec.kind}.queue", None)
        cluster.close()
        submit = cls.job_cls.submit_command
        raise RuntimeError(
            f"{spec.kind}: {submit} refused the worker job: {_command_error(err)} (queue "
            f"{queue!r}: set it in jobqueue.yaml or with --jobqueue queue=NAME)"
        ) from None
    _keep_jobs(cluster, jobs)
    logger.info("dashboard: %s", getattr(cluster, "dashboard_link", "?"))
    logger.info("submitted %d %s job(s):\n%s", jobs, spec.kind, cluster.job_script())
    return cluster


def job_settings(spec: ClusterSpec) -> dict:
    """Keyword arguments for SLURMCluster/PBSCluster: ``spec.jobqueue`` (``--jobqueue``) over
    the dask config (``~/.config/dask/jobqueue.yaml``, ``DASK_JOBQUEUE__SLURM__*``) over
    :data:`JOB_DEFAULTS`; dask-jobqueue reads the config itself, so only what it lacks is
    passed."""
    import dask

    configured = dask.config.get(f"jobqueue.{spec.kind}", default={}) or {}
    kwargs = {k: v for k, v in JOB_DEFAULTS.items() if configured.get(k) is None}
    # the workers' malloc settings, unless the user has a prologue (or the older env-extra,
    # which dask-jobqueue ignores once a prologue is given)
    keys = ("job-script-prologue", "job_script_prologue", "env-extra", "env_extra")
    if not any(configured.get(k) or spec.jobqueue.get(k) for k in keys):
        kwargs["job_script_prologue"] = [
            f"export {k}=${{{k}:-{v}}}" for k, v in WORKER_MALLOC_ENV.items()
        ]
    kwargs.update(spec.jobqueue)
    return kwargs


async def _submit(cluster, jobs: int) -> None:
    """Submit the jobs and wait for sbatch/qsub, in the cluster's loop: ``scale()`` would
    only schedule the submission, and a refused job would be logged and lost while the
    client waits for workers forever."""
    from distributed.core import Status

    while len(cluster.worker_spec) < jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        await cluster._correct_state()
    except RuntimeError:
        for job in cluster._created:  # never submitted: let close() skip them
            if job.status == Status.created:
                job.status = Status.failed
        raise


def _command_error(err: RuntimeError) -> str:
    """The stderr of a failed sbatch/qsub, from dask-jobqueue's multi-line error, as one line
    (``sbatch: error:`` prefixes dropped)."""
    text = str(err)
    stderr = text.split("stderr:", 1)[1] if "stderr:" in text else text
    lines = [re.sub(r"^\S+: error: ", "", ln.strip()) for ln in stderr.splitlines()]
    return "; ".join(ln for ln in lines if ln) or text.splitlines()[0]


def _keep_jobs(cluster, jobs: int) -> None:
    """Resubmit jobs that end while generating (scancel, preemption, walltime): their tasks
    go back to the other workers, and a replacement job joins when the queue allows."""
    from distributed.core import Status
    from tornado.ioloop import PeriodicCallback

    def top_up():
        if cluster.status == Status.running:
            cluster.scale(jobs=jobs)  # re-opens the jobs dask forgot as lost

    cluster.loop.add_callback(PeriodicCallback(top_up, KEEP_JOBS_EVERY_S * 1000).start)
