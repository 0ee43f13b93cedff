"""Where a night's lineage jobs run: in the rollover process one after another, or as Ray tasks.

    jobs = RayJobs(settings)          # or LocalJobs(settings, backend)
    while jobs.pending < jobs.room:   # room: how many jobs it takes at once
        jobs.submit(job)              # a training.lineage_job.LineageJob
    job, result = jobs.next_finished()   # whichever finishes first: a JobResult, or the exception it died of
    jobs.close()

Ray (`training.executor = "ray"`): each job is a task that declares `ray.cpus_per_job`,
`ray.gpus_per_job` and `ray.memory_gb_per_job`, so Ray packs as many lineages onto each machine or GPU
as those allow, and results come back as they finish. A task that raises, or whose worker process or
machine is lost, comes back as its exception; the rollover retries it once and otherwise fails only
that lineage. Each worker process keeps the base model loaded between jobs, so a worker that trains
several lineages loads it once. With `ray.address` unset a local Ray is started on this machine
(`ray.local_cpus`) for the night and stopped after it.
"""

from __future__ import annotations

import logging
import os
from collections import deque

from bot.config import Settings
from bot.model import ModelBackend
from training.lineage_job import JobResult, LineageJob, train_and_gate

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # jobs and results are a few MB of text and metrics


def training_backend(settings: Settings) -> ModelBackend:
    """The plain base model to train on (an int8 setting serves only: training loads the default dtype)."""
    trainable = "auto" if settings.model.dtype == "int8" else settings.model.dtype
    return ModelBackend.load(settings.model.model_copy(update={"adapter": None, "dtype": trainable}))


class LocalJobs:
    """Jobs one after another in this process, on one loaded base model (the default)."""

    room = 1  # jobs planned ahead of the one running: none

    def __init__(self, settings: Settings, backend: ModelBackend | None = None):
        self.settings = settings
        self.backend = backend
        self.queue: deque[LineageJob] = deque()

    @property
    def pending(self) -> int:
        return len(self.queue)

    def submit(self, job: LineageJob) -> None:
        self.queue.append(job)

    def next_finished(self) -> tuple[LineageJob, JobResult | Exception]:
        job = self.queue.popleft()
        try:
            self.backend = self.backend or training_backend(self.settings)
            return job, train_and_gate(job, self.backend)
        except Exception as exc:  # noqa: BLE001 - the lineage fails, the night goes on
            logger.exception("%s: the job failed", job.lineage)
            self.backend = None  # a failure inside training can leave LoRA layers in the base: load it again
            return job, exc

    def close(self) -> None:
        pass


class RayJobs:
    """Jobs as Ray tasks with declared resources; results in the order they finish."""

    def __init__(self, settings: Settings):
        try:
            import ray
        except ImportError:
            raise RuntimeError("training.executor = \"ray\" needs Ray: pip install 'banryeo[ray]'") from None
        self.ray = ray
        cfg = settings.ray
        self.running: dict = {}  # object ref -> job
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if cfg.address:
                ray.init(address=cfg.address, runtime_env={"env_vars": _worker_env()}, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.local_cpus or os.cpu_count(), include_dashboard=False,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False,
                         runtime_env={"env_vars": _worker_env()})
        try:
            cpus = self._declared_cpus(cfg)
        except RuntimeError:
            self.close()
            raise
        options = {"num_cpus": cpus, "num_gpus": cfg.gpus_per_job, "max_retries": 0}
        if cfg.memory_gb_per_job:
            options["memory"] = int(cfg.memory_gb_per_job * 1024**3)
        self.task = ray.remote(run_on_worker).options(**options)
        # Jobs handed to Ray at once: what the cluster can run now, and as many again queued so that no
        # worker waits for the next one to be planned (each carries a night's pairs: a few MB)
        cluster = ray.cluster_resources()
        fits = [cluster.get("CPU", 0) / cpus] + ([cluster.get("GPU", 0) / cfg.gpus_per_job] if cfg.gpus_per_job else [])
        self.room = 2 * max(1, int(min(fits)))

    def _declared_cpus(self, cfg) -> float:
        """CPUs per job: as configured, or this machine's cores (at most the largest node's). A job no node can
        run would wait forever in Ray's queue, so that is refused here with the reason."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        largest = max((n.get("CPU", 0) for n in nodes), default=0)
        cpus = cfg.cpus_per_job or min(cfg.local_cpus or os.cpu_count() or 1, largest) or 1
        if cpus > largest:
            raise RuntimeError(f"ray.cpus_per_job = {cpus:g}, but the largest machine of the Ray cluster has "
                               f"{largest:g} CPUs: no job could start")
        if cfg.gpus_per_job and not any(n.get("GPU", 0) >= cfg.gpus_per_job for n in nodes):
            raise RuntimeError(f"ray.gpus_per_job = {cfg.gpus_per_job:g}, but no machine of the Ray cluster has "
                               "that much GPU")
        return cpus

    @property
    def pending(self) -> int:
        return len(self.running)

    def submit(self, job: LineageJob) -> None:
        self.running[self.task.remote(job)] = job

    def next_finished(self) -> tuple[LineageJob, JobResult | Exception]:
        [ref], _ = self.ray.wait(list(self.running), num_returns=1)
        job = self.running.pop(ref)
        try:
            return job, self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the task raised, or its worker or node was lost
            logger.error("%s: the job failed on Ray: %s", job.lineage, describe_failure(exc))
            return job, exc

    def close(self) -> None:
        for ref in self.running:  # only when the rollover itself stops early
            self.ray.cancel(ref, force=True)
        if self.started_here:
            self.ray.shutdown()


def describe_failure(exc: BaseException) -> str:
    """One line for admins: what happened to a lineage's job."""
    try:
        from ray import exceptions as ray_errors
    except ImportError:  # the local executor's exceptions only
        ray_errors = None
    if ray_errors is not None:
        if isinstance(exc, ray_errors.WorkerCrashedError):
            return "its worker process died (killed, or out of memory)"
        if isinstance(exc, ray_errors.NodeDiedError):
            return "the machine running it left the cluster"
        if isinstance(exc, ray_errors.OutOfMemoryError):
            return "its worker was stopped by Ray for using too much memory"
        if isinstance(exc, ray_errors.RayTaskError) and exc.cause is not None:
            exc = exc.cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# -- on the worker --------------------------------------------------------------------------------

_loaded: tuple[str, ModelBackend] | None = None  # this worker process's base model, kept between jobs


def run_on_worker(job: LineageJob) -> JobResult:
    """The Ray task: train and gate one lineage with this worker's share of CPUs (and GPU)."""
    global _loaded
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    key = job.settings.model.model_dump_json()
    if _loaded is None or _loaded[0] != key:
        _loaded = None
        _loaded = (key, training_backend(job.settings))
    backend = _loaded[1]
    if ray.get_gpu_ids() and torch.cuda.is_available():
        backend.model.to("cuda")
    try:
        return train_and_gate(job, backend)
    except BaseException:
        _loaded = None  # a failure inside training can leave LoRA layers in the base: load it again
        raise


def _worker_env() -> dict[str, str]:
    """What workers need from this process's environment: no model hub, the same cache folders."""
    keep = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return {"HF_HUB_OFFLINE": "1", **{k: os.environ[k] for k in keep if k in os.environ}}
