"""``predict --engine ray``: a Ray Data pipeline of three stages.  Batches of sources are decoded in
CPU tasks, inspected by an actor pool whose actors each load the model once and run the one inspection
core (``clipfusion.inspection.Inspector``: score, maps at the image's size, thresholds, regions), and
rendered (overlays, masks: tens of milliseconds of CPU per image) in CPU tasks again, so a GPU neither
waits on JPEG decoding nor on PNG encoding.  Where the rendering tasks can reach ``--out`` (every node of
the cluster is this machine, or ``--shared-out`` says it is shared storage) they write the files
themselves, named by a random id, and the driver writes only the rows; otherwise the driver writes every
file and row, named by the row's position, as the local engine does.  The rows are the same either way.
Ray Data hands the batches back in their order (``preserve_order``), holding the early finishers in its
object store, not the driver."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

from clipfusion.distributed.payloads import (
    pack_decoded,
    pack_inspections,
    pack_outcomes,
    unpack_decoded,
    unpack_inspections,
    unpack_outcomes,
)
from clipfusion.distributed.recipe import DetectorRecipe
from clipfusion.inspection.core import InspectionSettings
from clipfusion.inspection.sources import read_sources
from clipfusion.inspection.writer import ImageWriter, Outcome, render_all
from clipfusion.ray_cluster import RayOptions, connect

logger = logging.getLogger(__name__)
# Memory each decoding task asks Ray for: enough for one batch of large frames.  It is also what keeps
# decoding in its own tasks: Ray Data fuses a task into the next actor only when their requests match.
DECODE_MEMORY = 512 * 2**20
# CPUs of one decoding and one rendering task: together one CPU beside the scoring workers (Ray's CPUs
# are scheduling tokens; the two stages mostly wait on each other's batches).
STAGE_CPUS = 0.5
# Decoding and rendering tasks running at once, per scoring worker.  Unbounded, Ray Data starts a task
# process per free half CPU, and each new process pays clipfusion's imports (seconds of CPU, torch
# included) before its first batch: measured as 2.3 s per batch on 2 cores (benchmarks/ray.py).
STAGE_TASKS_PER_WORKER = 2


def _decode(row: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """One batch's sources → its decoded images, in one cell (``payloads``: arrays and records): a batch
    must reach the inspector whole, as the local engine forms it."""
    return {"batch": row["batch"], "payload": pack_decoded(read_sources(row["sources"], max_pixels))}


class InspectingActor:
    """What one Ray actor runs: builds the detector and its inspector once, then one model pass per
    decoded batch."""

    def __init__(self, recipe: DetectorRecipe, settings: InspectionSettings) -> None:
        self.inspector = settings.inspector(recipe.build())

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        inspections = self.inspector.inspect_decoded(unpack_decoded(row["payload"]))
        return {"batch": row["batch"], "payload": pack_inspections(inspections)}


def _render(row: dict[str, Any], settings: InspectionSettings, out: str | None) -> dict[str, Any]:
    """A batch's inspections → rendered files (written into ``out`` here when given: the driver then
    receives names, not bytes)."""
    outcomes = render_all(unpack_inspections(row["payload"]), settings)
    if out is not None:  # the row's position is the driver's to know: a worker names files by a random id
        writer = ImageWriter(Path(out))
        outcomes = [outcome if isinstance(outcome, tuple) else
                    writer.store(f"w{uuid.uuid4().hex[:12]}_{PurePath(outcome.source).stem}", outcome)
                    for outcome in outcomes]
    return {"batch": row["batch"], "payload": pack_outcomes(outcomes)}


def workers_reach(ray: Any, shared_out: bool) -> bool:
    """Whether the rendering tasks can write ``--out`` at the driver's path: every live node of the cluster
    is this machine, or the user said ``--shared-out``."""
    here = ray.util.get_node_ip_address()
    return shared_out or all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])


def ray_scorer(recipe: DetectorRecipe, options: RayOptions, shared_out: bool = False) -> Any:
    """``make_scorer(settings, out)`` for ``clipfusion.tasks.predict.Engine``: batches inspected on Ray."""
    ray = connect(options, spare_cpus=2 * STAGE_CPUS)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # predict shows its own bar, per image
    context.execution_options.preserve_order = True  # in order, early finishers held in Ray's object store
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution plans and progress-bar notes

    stage_tasks = STAGE_TASKS_PER_WORKER * options.workers
    workers_write = workers_reach(ray, shared_out)
    logger.info("predict on Ray: %s", "the workers write the overlays, masks and maps; the driver the rows"
                if workers_write else "the driver writes every file (the cluster has nodes that may not reach "
                                      "--out: --shared-out if they do)")

    def make_scorer(settings: InspectionSettings, out: Path) -> Any:
        def score(batches: Sequence[Sequence[str]]) -> Iterator[list[Outcome]]:
            if not batches:
                return
            items = [{"batch": index, "sources": list(batch)} for index, batch in enumerate(batches)]
            dataset = (ray.data.from_items(items, override_num_blocks=len(items))
                       .map(_decode, fn_kwargs={"max_pixels": settings.max_pixels}, num_cpus=STAGE_CPUS,
                            memory=DECODE_MEMORY, concurrency=stage_tasks)
                       .map(InspectingActor, fn_constructor_args=(recipe, settings),
                            compute=ray.data.ActorPoolStrategy(size=options.workers),
                            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)
                       .map(_render, fn_kwargs={"settings": settings,
                                                "out": str(out.resolve()) if workers_write else None},
                            num_cpus=STAGE_CPUS,
                            concurrency=stage_tasks))
            for following, row in enumerate(dataset.iter_rows()):
                if row["batch"] != following:  # preserve_order failed us: the rows would be misattributed
                    raise RuntimeError(f"Ray Data returned batch {row['batch']} where batch {following} was due")
                yield unpack_outcomes(row["payload"])
        return score

    return make_scorer
