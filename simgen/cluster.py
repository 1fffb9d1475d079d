"""Dask clusters for dataset generation: in-process, local, an existing scheduler,
SLURM/PBS through dask-jobqueue, or one worker per GPU through dask-cuda.

Tasks are whole samples; the task graph never changes with the worker count, and sample i
depends only on (seed, i), so 1, 2 or 200 workers write bit-identical stores.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CLUSTERS = ("local", "slurm", "pbs", "cuda", "none")


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
        client = Client(spec.scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = _start_cluster(spec)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _quiet_distributed_logs() -> None:
    """Keep dask.distributed's per-worker INFO lines off the terminal unless the user
    asked for verbose logs (its loggers set their own levels on import)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _start_cluster(spec: ClusterSpec):
    import distributed  # noqa: F401  (creates its loggers, which we then quiet)

    if spec.quiet:
        _quiet_distributed_logs()
    if spec.kind == "local":
        from distributed import LocalCluster

        n = spec.workers or default_workers()
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    if spec.kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise RuntimeError("cluster 'cuda' needs dask-cuda: pip install -e .[gpu]") from None
        return LocalCUDACluster(threads_per_worker=1, dashboard_address=None)
    try:
        import dask_jobqueue
    except ImportError:
        raise RuntimeError(
            f"cluster {spec.kind!r} needs dask-jobqueue: pip install -e .[cluster]"
        ) from None
    cls = dask_jobqueue.SLURMCluster if spec.kind == "slurm" else dask_jobqueue.PBSCluster
    kwargs = {"cores": 1, "processes": 1, "memory": "8GB", "walltime": "02:00:00"}
    kwargs.update(spec.jobqueue)
    cluster = cls(**kwargs)
    cluster.scale(jobs=spec.workers or 1)
    logger.info("submitted %d %s job(s):\n%s", spec.workers or 1, spec.kind, cluster.job_script())
    return cluster
