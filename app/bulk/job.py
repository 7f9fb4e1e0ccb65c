"""A bulk job on Ray Data: paths -> decode (CPU tasks) -> score (an actor pool, the model loaded once per
actor) -> the driver writes the rows as Parquet parts (output.py).

Ray runs where it is pointed: ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a
local Ray starts in this process with the machine's CPUs and stops with the job. A Ray that the caller has
started already (``ray.init`` in a notebook or a test) is used as it is."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import ray

from app.bulk.decode import InputSpec, decode_batch
from app.bulk.inputs import list_inputs
from app.bulk.output import ResultFolder
from app.bulk.stages import BatchScorer, driver_check
from app.errors import InvalidInput
from app.settings import Settings

# A decode task holds a quarter of a CPU in Ray's accounting, so that actors asking for most of a node's CPUs
# still leave room to decode for them; at most one runs per CPU the actors leave (and at least one per node):
# each is a worker process of its own (the decoder's imports: ~2 s of CPU once), and one 64x64 PNG takes
# 0.5-0.9 ms.
DECODE_CPUS = 0.25
ACTOR_START_S = 900  # start and model load of the whole actor pool (a cold node: imports, weights, export)
# Paths per decode task: blocks of about this many bytes of prepared pixels (bounded below by one model
# batch, above by 1,024 paths and by a quarter of an actor's share), so a 256x256 model's blocks stay as
# small as a 32x32 model's. A block goes to one actor whole: the blocks are the unit of load balancing.
DECODE_BLOCK_BYTES = 8 * 1024 * 1024


@dataclass
class BulkOptions:
    profile: str | None = None  # default: Settings.default_profile
    column: str = "path"  # the column of paths in a Parquet or CSV INPUT
    concurrency: int | None = None  # actors; None: one per GPU (num_gpus_per_actor > 0), else one per node
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 64  # images per model batch
    part_rows: int = 4096  # rows per Parquet part: what a crash can cost, at most
    resume: bool = False
    address: str | None = None  # a Ray cluster; None: RAY_ADDRESS, else a local Ray


@dataclass
class BulkSummary:
    out: str
    inputs: int = 0  # paths INPUT named
    skipped: int = 0  # already in OUT (resume)
    rows: int = 0  # written by this run
    errors: int = 0  # of which error rows
    parts: int = 0
    actors: int = 0
    seconds: float = 0.0
    nodes: list[str] = field(default_factory=list)  # Ray nodes that scored this run's rows


def score_dataset(
    source: str | Path, out: str | Path, settings: Settings | None = None, options: BulkOptions | None = None
) -> BulkSummary:
    """Score every image ``source`` names (inputs.list_inputs) into the Parquet folder ``out``."""
    started = time.perf_counter()
    settings = settings or Settings()  # type: ignore[call-arg]  # from the environment
    if not settings.model_dir.is_absolute():  # workers need not share the driver's working directory
        settings = settings.model_copy(update={"model_dir": settings.model_dir.resolve()})
    options = options or BulkOptions()
    if options.batch_size < 1 or options.part_rows < 1:
        raise InvalidInput("batch size and rows per part must be at least 1")
    paths = list_inputs(source, options.column)
    spec, profile_doc = driver_check(settings, options.profile or settings.default_profile)
    folder = ResultFolder(out)
    done = folder.prepare(options.resume, profile_doc["model_id"], profile_doc["name"])
    todo = pa.table({"path": pa.array(paths, pa.string())})
    if len(done):
        todo = todo.filter(pc.invert(pc.is_in(todo.column("path"), value_set=done)))
    summary = BulkSummary(out=str(folder.path), inputs=len(paths), skipped=len(paths) - todo.num_rows)
    if todo.num_rows:
        owned = _connect(options.address)
        try:
            _run(todo, spec, profile_doc, settings, options, folder, summary)
        finally:
            if owned:
                ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary


def _connect(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (and so stops it)."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False)
    return True


def _run(
    todo: pa.Table,
    spec: InputSpec,
    profile_doc: dict[str, Any],
    settings: Settings,
    options: BulkOptions,
    folder: ResultFolder,
    summary: BulkSummary,
) -> None:
    summary.actors = options.concurrency or default_concurrency(
        options.num_gpus_per_actor, options.cpus_per_actor
    )
    dataset = pipeline(todo, spec, profile_doc, settings, options, summary.actors)
    nodes: set[str] = set()
    for batch in dataset.iter_batches(batch_size=options.part_rows, batch_format="pyarrow"):
        part = cast(pa.Table, batch)
        folder.write(part)
        summary.rows += part.num_rows
        summary.errors += part.num_rows - part.column("error").null_count
        nodes.update(pc.unique(part.column("node")).to_pylist())
    summary.parts = folder.parts_written
    summary.nodes = sorted(nodes)


def pipeline(
    todo: pa.Table,
    spec: InputSpec,
    profile_doc: dict[str, Any],
    settings: Settings,
    options: BulkOptions,
    actors: int,
) -> ray.data.Dataset:
    """paths -> decode tasks -> the scoring actor pool -> result rows (lazy: runs as the rows are read)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    # Rows flow once every actor has loaded its model: the first one ready would otherwise take the early
    # blocks alone; and a pool the cluster cannot place fails after this long instead of waiting forever.
    context.wait_for_min_actors_s = ACTOR_START_S
    pixels = DECODE_BLOCK_BYTES // max(1, 4 * spec.channels * spec.size**2)
    spread = -(-todo.num_rows // (4 * actors))  # a small data set still gives every actor a few blocks
    per_block = max(options.batch_size, min(1024, pixels, spread))
    blocks = [todo.slice(start, per_block) for start in range(0, todo.num_rows, per_block)]
    spare = ray.cluster_resources().get("CPU", 1.0) - actors * options.cpus_per_actor
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0)
    decoded = ray.data.from_arrow(blocks).map_batches(
        partial(decode_batch, spec=spec),
        batch_size=None,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
        concurrency=max(nodes, int(spare)),  # at least one per node: every node's actors have local blocks
    )
    return decoded.map_batches(
        BatchScorer,
        fn_constructor_args=(settings, profile_doc),
        batch_size=options.batch_size,
        batch_format="numpy",
        # two blocks per actor: one scored, one prefetched; more would let the actor beside the decoder that
        # made them (Ray prefers local blocks) hoard the work while another idles
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.num_gpus_per_actor,
    )


def default_concurrency(num_gpus_per_actor: float, cpus_per_actor: float) -> int:
    """One actor per GPU share when actors take GPUs, else one per node that has the CPUs for one."""
    if num_gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < num_gpus_per_actor:
            raise InvalidInput(
                f"the Ray cluster has {gpus:g} GPU(s); each actor asks for {num_gpus_per_actor:g}"
            )
        return int(gpus // num_gpus_per_actor)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus_per_actor]
    return max(1, len(nodes))
