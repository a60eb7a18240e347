"""Distributed indexing on a Ray cluster: `glimr index build IMAGES_DIR --index DIR --ray [ADDRESS]`.

The driver (the process that runs the command) does everything a local build does (glimr/index/build.py,
:func:`~glimr.index.build.run_build`): it lists IMAGES_DIR, skips the files already indexed, removes those that
are gone, and commits every chunk with :func:`~glimr.index.build.commit_shard` (vectors appended and fsynced,
then rows in one SQLite transaction). Only the embedding moves: each chunk's list of file *paths* goes to an
:class:`EmbedWorker` actor, which loaded the model once (the same ExtractSettings as a local build), reads
and decodes the files itself and returns the chunk's shard (descriptors, errors, content hashes). No image
bytes go through the driver, so IMAGES_DIR must be on shared storage, at the same path on every node.

What happens when something fails:

- a worker process that dies (killed, out of memory, a crash in a decoder) is restarted by Ray
  (``max_restarts=-1``) and its batch is submitted again, to another actor when there is one. After
  ``max_attempts`` failed tries a batch is split into single files; a file whose worker died
  ``max_attempts`` times while reading it alone, while the other workers answer, is reported and kept as an
  error row like any unreadable file: one bad file never aborts the build.
- a driver that dies loses only the chunks not committed yet: a new run skips the committed files (same size
  and mtime) and embeds the rest. Shards are committed in chunk order, so the rows, their vids and
  vectors.f32 are those a local build writes.
- a bad file is reported by the worker exactly as in a local build (the same message, naming the file).
- an exception raised by glimr's code inside a worker (a bug, not a dead process) stops the build with that
  error; committed chunks stay.
- no answer from any worker for ``stall_timeout`` seconds (e.g. a lost node whose actors cannot be placed
  again) stops the build with an error; run it again to resume.

Ray is imported only here and only when ``--ray`` is given (``pip install 'glimr[ray]'``); glimr must be
installed, in the same version, on every node.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from glimr.index.build import (
    COMPACT_FRACTION,
    BuildReport,
    Shard,
    _hash_or_none,
    resolve_build_settings,
    run_build,
)
from glimr.models.checkpoint import model_fingerprint

MAX_ACTORS = 100_000


class RayBuildError(RuntimeError):
    """A Ray build cannot go on: Ray missing, the cluster unreachable, workers that cannot start or keep dying.
    Committed chunks stay; running the build again resumes it."""


def import_ray():
    """The ``ray`` module, or a RayBuildError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RayBuildError("--ray needs the `ray` package: pip install 'glimr[ray]' (on this machine and on every "
                            "node of the cluster, beside glimr)") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """How a build uses the cluster (validated when built; not stored in index.json: it does not change the
    descriptors).

    address: the head node's HOST:PORT, "auto" (a cluster started with `ray start` on this machine or
    RAY_ADDRESS), or None: join a local cluster if there is one, else start one in this process.
    actors: how many EmbedWorker actors (None: as many as the cluster's CPUs, or GPUs when ``gpus`` > 0,
    allow); cpus / gpus: the resources each actor asks for (its torch threads = cpus; with gpus > 0 the model
    runs on the actor's GPU). task_size: files per task (a chunk of the index, committed at once, is cut into
    tasks so that it spreads over the actors). in_flight: tasks queued per actor (the next waits while one
    runs).
    max_attempts: tries of a batch whose worker died (then its files are tried one by one).
    start_timeout / stall_timeout: seconds to wait for the actors to load their model / for any answer."""

    address: str | None = None
    actors: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    in_flight: int = 2
    task_size: int = 32
    max_attempts: int = 3
    start_timeout: float = 600.0
    stall_timeout: float = 1800.0

    def __post_init__(self):
        from glimr.config import whole_number

        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()
                                         or len(self.address) > 500):
            raise ValueError(f"Ray address must be HOST:PORT, 'auto' or empty (local), got {self.address!r}")
        object.__setattr__(self, "actors", whole_number("actors (--ray-actors)", self.actors, 1, MAX_ACTORS,
                                                   none_ok=True))
        object.__setattr__(self, "in_flight", whole_number("in_flight", self.in_flight, 1, 64))
        object.__setattr__(self, "task_size", whole_number("task_size", self.task_size, 1, 1_000_000))
        object.__setattr__(self, "max_attempts", whole_number("max_attempts", self.max_attempts, 1, 100))
        for name, lo_open, hi in (("cpus", True, 1024), ("gpus", False, 64), ("start_timeout", True, 1e6),
                                  ("stall_timeout", True, 1e7)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= 0 if lo_open else v < 0) or v > hi:
                raise ValueError(f"{name} must be a number {'>' if lo_open else '>='} 0 and <= {hi:g}, got {v!r}")
            object.__setattr__(self, name, float(v))


def model_spec(model, settings, weights: str = "pretrained") -> dict:
    """What a worker needs to build the driver's model: build_model's arguments."""
    spec = {"name": settings.model, "checkpoint": settings.checkpoint, "weights": weights}
    head_kwargs = (getattr(model, "config", None) or {}).get("head_kwargs") or {}
    if settings.checkpoint is None and head_kwargs:
        spec["head_kwargs"] = dict(head_kwargs)
    return spec


class EmbedWorker:
    """A Ray actor (made one with ``ray.remote``): builds the model once, then embeds lists of files that it
    reads itself. Returns plain arrays, dicts and lists (no glimr objects cross the cluster)."""

    def __init__(self, spec: dict, settings_json: dict, cpus: float, gpus: float):
        import torch

        from glimr.extract.multiscale import ExtractSettings
        from glimr.models.registry import build_model

        settings = ExtractSettings.from_json(settings_json)
        settings.check_checkpoint()  # the very checkpoint the driver hashed, on this node's shared storage
        threads = max(1, int(cpus))
        torch.set_num_threads(threads)
        if settings.workers is None:  # the actor's share of the node, not the node's cores
            settings = settings.replace(workers=0 if threads <= 2 else min(4, threads // 2))
        self.settings = settings
        self.model = build_model(spec["name"], checkpoint=spec["checkpoint"], weights=spec["weights"],
                                 warn_untrained=False, **spec.get("head_kwargs", {}))
        self.fingerprint = model_fingerprint(self.model)
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model = self.model.to(self.device).eval()

    def info(self) -> dict:
        import ray

        import glimr

        return {"pid": os.getpid(), "host": os.uname().nodename, "node": ray.get_runtime_context().get_node_id(),
                "version": glimr.__version__, "fingerprint": self.fingerprint, "dim": int(self.model.dim),
                "device": self.device}

    def embed(self, paths: list[str]) -> tuple[np.ndarray, dict[int, str], list[str | None]]:
        from glimr.extract.multiscale import extract

        res = extract(self.model, [Path(p) for p in paths], settings=self.settings, progress=False,
                      report_errors=False)
        hashes = [None if i in res.errors else _hash_or_none(Path(p)) for i, p in enumerate(paths)]
        return res.descriptors, res.errors, hashes


@dataclass
class _Task:
    seq: int                 # the chunk it belongs to
    offset: int              # its first file's position in the chunk
    paths: list[str]
    attempt: int = 0
    actor: int = -1          # the actor running it
    avoid: int = -1          # the actor it failed on


@dataclass
class _Assembly:
    """A chunk's shard being put together from its tasks' answers."""
    desc: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    hashes: list[str | None] = field(default_factory=list)
    missing: int = 0


class RayEmbedder:
    """The embedder of a Ray build (see glimr.index.build.Embedder): connects on :meth:`connect`, starts its
    actors on the first chunk, returns the shards in chunk order, frees the actors (and a Ray it started)
    on :meth:`close`."""

    def __init__(self, model, settings, ray_settings: RaySettings, *, weights: str = "pretrained"):
        self.rs = ray_settings
        self.settings = settings
        self.spec = model_spec(model, settings, weights)
        self.fingerprint = model_fingerprint(model)
        self.dim = int(model.dim)
        self.ray = None
        self.actors: list = []
        self._owns_ray = False
        self.ready_at: float | None = None  # time.monotonic() when the actors had loaded their model
        self.retried = 0          # batches submitted again after their worker died
        self.files_failed = 0     # files reported because their worker kept dying

    # ---- cluster -------------------------------------------------------------------------------------
    def connect(self) -> None:
        ray = import_ray()
        self.ray = ray
        if ray.is_initialized():
            return
        address = self.rs.address or None
        kw = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
        if address is None:
            # a local cluster started here: no usage report (offline machines), unless the user asked for one
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = f"at '{address}'" if address else "on this machine"
            raise RayBuildError(f"cannot connect to a Ray cluster {where}: {_first_line(e)}. Start it first (`ray "
                                "start --head` on the head node, `ray start --address=HEAD:PORT` on the others) "
                                "or leave out the address to start a local one") from None
        self._owns_ray = True

    def _start_actors(self) -> None:
        ray, rs = self.ray, self.rs
        if rs.actors is not None:
            n = rs.actors
        else:
            res = ray.cluster_resources()
            n = int(res.get("GPU", 0) // rs.gpus) if rs.gpus > 0 else int(res.get("CPU", 0) // rs.cpus)
            if n < 1:
                what = f"{rs.gpus:g} GPU" if rs.gpus > 0 else f"{rs.cpus:g} CPU"
                raise RayBuildError(f"the Ray cluster has no room for one worker of {what} (its resources: "
                                    f"{_resources(res)}); lower --ray-cpus/--ray-gpus or add nodes")
        cls = ray.remote(EmbedWorker)
        opts = {"num_cpus": rs.cpus, "num_gpus": rs.gpus, "max_restarts": -1, "max_task_retries": 0,
                "scheduling_strategy": "SPREAD"}
        actors = [cls.options(**opts).remote(self.spec, self.settings.to_json(), rs.cpus, rs.gpus)
                  for _ in range(n)]
        refs = [a.info.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=rs.start_timeout)
        infos, started = [], []
        for a, ref in zip(actors, refs):
            if ref not in ready:
                self._kill([a])
                continue
            try:
                infos.append(ray.get(ref))
                started.append(a)
            except ray.exceptions.RayError as e:
                self._kill(actors)
                raise RayBuildError(f"the Ray workers could not start: {_cause(e)} (is glimr {_version()} "
                                    "installed on every node, and the checkpoint on shared storage?)") from None
        if not started:
            raise RayBuildError(f"no Ray worker started within {rs.start_timeout:g} s (cluster resources: "
                                f"{_resources(ray.cluster_resources())}); check `ray status`")
        if len(started) < n:
            tqdm.write(f"ray: {len(started)} of {n} workers started within {rs.start_timeout:g} s; going on with "
                       "them", file=sys.stderr)
        for info in infos:
            if info["version"] != _version():
                self._kill(started)
                raise RayBuildError(f"the Ray worker on {info['host']} runs glimr {info['version']}, this process "
                                    f"{_version()}: install the same version on every node")
            if info["fingerprint"] != self.fingerprint or info["dim"] != self.dim:
                self._kill(started)
                raise RayBuildError(
                    f"the Ray worker on {info['host']} built other weights for model {self.spec['name']!r} than "
                    "this process (random weights, --weights none, cannot be rebuilt elsewhere; or the nodes have "
                    "other model files): use a trained checkpoint on shared storage or a packaged model")
        self.actors = started
        self.infos = infos
        self.ready_at = time.monotonic()
        nodes = len({i["node"] for i in infos})
        tqdm.write(f"ray: {len(started)} worker{'s' if len(started) > 1 else ''} on {nodes} "
                   f"node{'s' if nodes > 1 else ''} "
                   f"({rs.cpus:g} CPU{f', {rs.gpus:g} GPU' if rs.gpus else ''} each, model on "
                   f"{infos[0]['device']})", file=sys.stderr)

    def _kill(self, actors) -> None:
        for a in actors:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(a)

    def close(self) -> None:
        if self.ray is None:
            return
        self._kill(self.actors)
        self.actors = []
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_ray = False

    # ---- embedding -----------------------------------------------------------------------------------
    def __call__(self, batches: Iterable[list[Path]], ca) -> Iterator[Shard]:
        """The shards of ``batches`` (one per list of files, in order). Each list is cut into tasks of at most
        ``task_size`` files, so that a chunk's work spreads over the actors; at most ``in_flight`` tasks wait
        per actor, and at most max(4, 2 x tasks in flight) chunks are read ahead of the last one returned."""
        if ca is not None:
            raise ValueError("co-attention features are not extracted on Ray yet: build this index without --ray")
        if self.ray is None:
            self.connect()
        ray, rs = self.ray, self.rs
        n_act = len(self.actors)           # the actors start with the first file to embed, not before
        load = [0] * n_act
        window = max(1, n_act * rs.in_flight)
        running: dict = {}                 # ObjectRef -> _Task
        retry: deque[_Task] = deque()      # tasks whose worker died, submitted first
        fresh: deque[_Task] = deque()      # tasks of the chunks read, not submitted yet
        parts: dict[int, _Assembly] = {}
        ready: dict[int, Shard] = {}
        batches = iter(batches)
        n_read = n_done = 0                # chunks read from ``batches`` / returned
        exhausted = False

        def submit(task: _Task) -> None:
            nonlocal n_act, load, window
            if not self.actors:
                self._start_actors()
                n_act = len(self.actors)
                load = [0] * n_act
                window = n_act * rs.in_flight
            choices = [i for i in range(n_act) if i != task.avoid] or list(range(n_act))
            a = min(choices, key=lambda i: load[i])
            task.actor = a
            load[a] += 1
            running[self.actors[a].embed.remote(task.paths)] = task

        def finish_part(task: _Task, desc, errors, hashes) -> None:
            asm = parts[task.seq]
            k = len(task.paths)
            if desc is not None:
                asm.desc[task.offset:task.offset + k] = desc
            for j, e in errors.items():
                asm.errors[task.offset + int(j)] = e
            asm.hashes[task.offset:task.offset + k] = hashes
            asm.missing -= k
            if asm.missing == 0:
                del parts[task.seq]
                ready[task.seq] = Shard(asm.desc, asm.errors, asm.hashes)

        while True:
            while len(running) < window:
                if retry or fresh:
                    submit((retry or fresh).popleft())
                    continue
                if exhausted or n_read - n_done >= max(4, 2 * window):
                    break
                try:
                    items = next(batches)
                except StopIteration:
                    exhausted = True
                    break
                seq, n_read = n_read, n_read + 1
                paths = [os.path.abspath(p) for p in items]  # the workers' working folders are not ours
                parts[seq] = _Assembly(np.zeros((len(paths), self.dim), np.float32), hashes=[None] * len(paths),
                                       missing=len(paths))
                if not paths:
                    finish_part(_Task(seq, 0, []), None, {}, [])
                fresh.extend(_Task(seq, o, paths[o:o + rs.task_size]) for o in range(0, len(paths), rs.task_size))
            while n_done in ready:
                yield ready.pop(n_done)
                n_done += 1
            if not running:
                if retry or fresh or not exhausted:
                    continue
                if n_done != n_read:  # cannot happen: every chunk read is returned, or has a task somewhere
                    raise RuntimeError(f"Ray build: chunks {sorted(parts)} have no task left")
                return
            done, _ = ray.wait(list(running), num_returns=1, timeout=rs.stall_timeout)
            if not done:
                raise RayBuildError(f"no Ray worker answered for {rs.stall_timeout:g} s (a lost node?): check `ray "
                                    "status`; run the build again to resume (committed chunks are kept)")
            for ref in done:
                task = running.pop(ref)
                load[task.actor] -= 1
                try:
                    desc, errors, hashes = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise RayBuildError(f"a Ray worker failed on the batch that starts with '{task.paths[0]}': "
                                        f"{_cause(e)}") from None
                except ray.exceptions.RayError as e:
                    self._failed(task, e, retry, finish_part)
                    continue
                finish_part(task, desc, errors, hashes)

    def _failed(self, task: _Task, e: BaseException, retry: deque, finish_part) -> None:
        """A task whose worker died: again elsewhere, split into single files, or (a file that kills every
        worker that reads it, while the others answer) reported as unreadable."""
        from glimr.io.images import ImageError

        why = _cause(e)
        task.attempt += 1
        task.avoid = task.actor
        what = f"{len(task.paths)} images from '{task.paths[0]}'" if len(task.paths) > 1 else f"'{task.paths[0]}'"
        if task.attempt < self.rs.max_attempts:
            self.retried += 1
            tqdm.write(f"ray: the worker embedding {what} died ({why}); retrying on another worker "
                       f"(try {task.attempt + 1} of {self.rs.max_attempts})", file=sys.stderr)
            retry.append(task)
        elif len(task.paths) > 1:
            tqdm.write(f"ray: the workers embedding {what} died {task.attempt} times; trying its files one by one",
                       file=sys.stderr)
            retry.extend(_Task(task.seq, task.offset + i, [p], avoid=task.actor) for i, p in enumerate(task.paths))
        elif self._healthy():
            self.files_failed += 1
            err = ImageError(task.paths[0], f"the Ray worker reading it died {task.attempt} times ({why})",
                             "check the file: it may crash the image decoder")
            finish_part(task, None, {0: str(err)}, [None])
        else:
            raise RayBuildError(f"the Ray workers keep dying ({why}) and none answers: check the cluster (`ray "
                                "status`, the workers' logs); run the build again to resume") from None

    def _healthy(self) -> bool:
        """Does at least one actor answer (within start_timeout: a restarted one loads its model again)?"""
        refs = [a.info.remote() for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=self.rs.start_timeout)
        for ref in ready:
            try:
                self.ray.get(ref)
                return True
            except self.ray.exceptions.RayError:
                pass
        return False


def build_index_ray(images_dir: str | Path, index_dir: str | Path, model, *, ray_settings: RaySettings | None = None,
                    weights: str = "pretrained", settings=None, index_settings=None, prune: bool = False,
                    progress: bool = True, compact_fraction: float = COMPACT_FRACTION, **loose) -> BuildReport:
    """Index (or update) ``images_dir`` like glimr.index.build.build_index, the embedding done by Ray actors.

    model: the model built here (its dimension, and the weights every worker must reproduce: checked by a
    fingerprint); the workers build it again from the settings' model name / checkpoint and ``weights``.
    ray_settings: the cluster and the actors (:class:`RaySettings`; default: join or start a local Ray, one
    actor per CPU). Other arguments as build_index (co-attention is not supported here)."""
    settings, index_settings = resolve_build_settings(model, settings, index_settings, loose)
    if index_settings.coattention:
        raise ValueError("co-attention features are not extracted on Ray yet: build this index without --ray")
    embedder = RayEmbedder(model, settings, ray_settings or RaySettings(), weights=weights)
    embedder.connect()  # before anything is written: an unreachable cluster changes nothing
    try:
        return run_build(images_dir, index_dir, settings, index_settings, embed=embedder, prune=prune,
                         progress=progress, compact_fraction=compact_fraction)
    finally:
        if embedder.retried:
            tqdm.write(f"ray: {embedder.retried} batches were retried after their worker died", file=sys.stderr)
        embedder.close()


def add_cli_args(p) -> None:
    """The --ray options of `glimr index build`."""
    from glimr.config import float_in, int_in

    g = p.add_argument_group(
        "Ray cluster (distributed extraction)",
        "The workers read the images themselves (this process sends them paths, not bytes): IMAGES_DIR must be\n"
        "on shared storage, at the same path on every node (NFS, a cluster file system). glimr (the same\n"
        "version) and any --checkpoint must be on every node too. This process commits each returned shard into\n"
        "--index as a local build does: stop it at any time and run it again to resume. Not with --coattention.")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="embed on a Ray cluster (pip install 'glimr[ray]'): ADDRESS is the head's HOST:PORT or "
                        "'auto'; without it a local Ray is joined, or started")
    g.add_argument("--ray-actors", type=int_in(1, MAX_ACTORS), default=None,
                   help="Ray workers, each with its own model (default: as many as the cluster's CPUs / --ray-cpus, "
                        "or GPUs / --ray-gpus)")
    g.add_argument("--ray-cpus", type=float_in(0, 1024, lo_open=True), default=1.0,
                   help="CPUs per Ray worker (its torch threads)")
    g.add_argument("--ray-gpus", type=float_in(0, 64), default=0.0,
                   help="GPUs per Ray worker (> 0: the model runs on the worker's GPU)")


def settings_from_args(args) -> RaySettings | None:
    """RaySettings of --ray/--ray-actors/--ray-cpus/--ray-gpus, or None without --ray."""
    if getattr(args, "ray", None) is None:
        return None
    return RaySettings(address=args.ray or None, actors=args.ray_actors, cpus=args.ray_cpus, gpus=args.ray_gpus)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _cause(e: BaseException) -> str:
    """The useful line of a Ray error (its cause's, for an exception raised inside a worker)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(e).__name__}: {_first_line(e)}"


def _resources(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items())) or "none"


def _version() -> str:
    import glimr

    return glimr.__version__
