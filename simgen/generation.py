"""Dataset generation: plan a store, run the missing samples through Dask, resume.

Samples are computed in tasks of consecutive samples (8 for the fast models, see
:func:`simgen.pipeline.samples_per_task`). Each task computes its samples from
(config, seed, i) and writes whole chunks of the store, then the completion flags.
Re-running the same command continues a store; a different config is refused unless
``overwrite``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simgen import store
from simgen.cluster import ClusterSpec, open_client

logger = logging.getLogger(__name__)

_WORKER_CACHE: dict = {}


@dataclass(frozen=True)
class GenerateReport:
    path: str
    n_samples: int
    computed: int
    skipped: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


def _task(
    store_path: str, config_dict: dict, calibration: dict | None, indices: list[int], store_id=""
):
    """Run on a worker: compute and write samples ``indices`` (one chunk group).

    ``store_id`` tells stores at one path apart (a store replaced with ``overwrite`` gets
    new chunks), so the worker's cached writer is never that of a store since removed."""
    from simgen.backend import mark_fallback_reported
    from simgen.config import SimgenConfig
    from simgen.pipeline import make_sample

    mark_fallback_reported()

    key = (store_path, repr(config_dict), store_id)
    if _WORKER_CACHE.get("key") != key:
        _WORKER_CACHE.clear()
        _WORKER_CACHE.update(
            key=key,
            config=SimgenConfig.from_dict(config_dict),
            writer=store.SampleWriter(store.open_store(store_path, mode="r+")),
        )
    cfg, writer = _WORKER_CACHE["config"], _WORKER_CACHE["writer"]
    samples = [make_sample(cfg, i, calibration=calibration) for i in indices]
    writer.write(indices, samples)
    return len(indices)


def generate(
    cfg,
    out: str | Path,
    *,
    cluster: ClusterSpec | None = None,
    overwrite: bool = False,
    calibration: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> GenerateReport:
    """Generate (or continue) the dataset ``cfg`` into the store ``out``.

    Parameters
    ----------
    cfg : SimgenConfig
    out : path
        Store directory (``*.zarr``).
    cluster : ClusterSpec, optional
        Where tasks run (default: a local cluster sized to the machine).
    overwrite : bool
        Replace an existing store instead of continuing it.
    calibration : dict, optional
        Incoherent-model calibration (computed and cached by the caller). A resumed store
        keeps the calibration stored in it (its finished samples were made with it).
    stop_after : int, optional
        Stop after this many tasks (tests of interruption).
    """
    from simgen.backend import resolve_device
    from simgen.pipeline import SAMPLE_VERSION, sample_version, store_attrs, store_layout

    cluster = cluster or ClusterSpec()
    resolve_device(cfg.simulation.device)  # says once, here, if 'auto' falls back to the CPU
    out = Path(out)
    layout = store_layout(cfg)
    config_dict = cfg.to_dict()
    with store.WriterLock(out):
        if out.exists() and not overwrite and not store.creation_unfinished(out):
            normalize = type(cfg).from_dict
            root = store.open_for_resume(
                out, config_dict, layout, normalize=lambda d: normalize(d).to_dict()
            )
            created = False
            made_by = sample_version(root.attrs)
            if made_by != SAMPLE_VERSION:
                # its finished samples would not match the ones made now, bit for bit
                raise store.StoreError(
                    f"{out} holds samples of sample version {made_by}; this simgen makes "
                    f"version {SAMPLE_VERSION} (they differ in the last digits): finish it with "
                    "the simgen that started it, or use --overwrite"
                )
            stored = root.attrs.get("calibration")
            if stored is not None and stored != calibration:
                # the store's samples were made with its own calibration (an older
                # version, or one recomputed since): the rest are made with it too
                logger.info("resuming %s with its own calibration %s", out, stored.get("key", "?"))
                calibration = stored
        else:  # new, replaced, or killed while being created (holds no sample)
            replace = overwrite or store.creation_unfinished(out)
            root = store.create_store(out, layout, store_attrs(cfg, calibration), overwrite=replace)
            created = True
        args = (cfg, out, root, layout, config_dict, cluster, calibration, progress)
        try:
            return _run_tasks(*args, stop_after, on_progress)
        except (OSError, TimeoutError, RuntimeError, ValueError):
            # nothing computed (e.g. no scheduler answered): leave no empty store behind
            if created and not store.complete_flags(root).any():
                store.remove_own_store(out)
            raise


def _run_tasks(
    cfg, out, root, layout, config_dict, cluster, calibration, progress, stop_after, on_progress
):
    """Compute the store's pending samples as tasks (under the caller's writer lock)."""
    pending = store.pending_indices(root)
    k = store.samples_per_task(root)  # a task owns whole chunks of every array
    groups = sorted({int(i) // k for i in pending})
    tasks = [list(range(g * k, min((g + 1) * k, layout.n_samples))) for g in groups]
    if stop_after is not None:
        tasks = tasks[:stop_after]
    # a task recomputes (bit-identically) the finished samples it shares chunks with; only
    # its pending ones count as computed
    pending_set = {int(i) for i in pending}
    counts = [sum(i in pending_set for i in idx) for idx in tasks]
    store_id = f"{root.attrs.get('created')}/{k}/{id(root)}"
    skipped = layout.n_samples - len(pending)
    t0 = time.perf_counter()
    done = 0
    bar = _progress_bar(len(pending), progress, initial=0)
    try:
        if cluster.kind == "none" and cluster.scheduler is None:
            from simgen.cluster import tune_malloc_in_process

            tune_malloc_in_process()  # as the workers are (image temporaries on the heap)
            for indices, n in zip(tasks, counts, strict=True):
                _task(str(out), config_dict, calibration, indices, store_id)
                done += n
                _tick(bar, n, done, t0, on_progress, len(pending))
        else:
            with open_client(cluster) as client:
                from distributed import as_completed

                futures = {
                    client.submit(
                        _task, str(out), config_dict, calibration, idx, store_id, pure=False
                    ): n
                    for idx, n in zip(tasks, counts, strict=True)
                }
                for fut in as_completed(list(futures)):
                    fut.result()
                    n = futures[fut]
                    done += n
                    _tick(bar, n, done, t0, on_progress, len(pending))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return GenerateReport(str(out), layout.n_samples, done, skipped, seconds)


def _progress_bar(total, enabled, initial=0):
    if not enabled or total == 0:
        return None
    import sys

    from tqdm.auto import tqdm

    # in a batch log (no terminal) refresh every 10 s instead of many times a second
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(
        total=total,
        initial=initial,
        unit="sample",
        desc="generate",
        smoothing=0.1,
        mininterval=interval,
    )


def _tick(bar, n, done, t0, on_progress, total):
    if bar is not None:
        bar.update(n)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{rate:.2f} samples/s", refresh=False)
    if on_progress is not None:
        on_progress(done, total)


def stores_identical(a: str | Path, b: str | Path) -> bool:
    """True when two stores hold bit-identical arrays (attributes' timestamps ignored)."""
    ra, rb = store.open_store(a), store.open_store(b)

    def arrays(group, prefix=""):
        for name, arr in group.arrays():
            yield prefix + name, arr
        for name, sub in group.groups():
            yield from arrays(sub, prefix + name + "/")

    da, db = dict(arrays(ra)), dict(arrays(rb))
    if set(da) != set(db):
        return False
    return all(
        np.array_equal(np.asarray(da[k][...]), np.asarray(db[k][...]), equal_nan=True) for k in da
    )
