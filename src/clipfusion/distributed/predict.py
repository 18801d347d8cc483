"""``predict --engine ray``: a Ray Data pipeline of three stages.  Batches of sources are decoded in
CPU tasks, scored by an actor pool whose actors each load the model once and keep it on their device,
and rendered (regions, overlays, masks: tens of milliseconds of CPU per image) in CPU tasks again, so
a GPU neither waits on JPEG decoding nor on PNG encoding.  The driver writes every file and row,
exactly as the local engine does, from the same batches, so the outputs are the same."""
from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

from clipfusion.distributed.cluster import RayOptions, connect
from clipfusion.distributed.recipe import DetectorRecipe
from clipfusion.tasks.predict import Outcome, RowSettings, Scorer, decode_batch, predict_batch, render_batch

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
    """One batch's sources → its decoded images.  Images of different sizes travel pickled in one
    binary cell: a batch must reach the scorer whole, as the local engine forms it."""
    return {"batch": row["batch"], "payload": pickle.dumps(decode_batch(row["sources"], max_pixels), protocol=5)}


class ScoringActor:
    """What one Ray actor runs: builds the detector once, then one model pass per decoded batch."""

    def __init__(self, recipe: DetectorRecipe, category: str) -> None:
        self.detector, self.category = recipe.build(), category

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        scored = predict_batch(self.detector, pickle.loads(row["payload"]), self.category)
        return {"batch": row["batch"], "payload": pickle.dumps(scored, protocol=5)}


def _render(row: dict[str, Any], settings: RowSettings) -> dict[str, Any]:
    outcomes = render_batch(pickle.loads(row["payload"]), settings)
    return {"batch": row["batch"], "payload": pickle.dumps(outcomes, protocol=5)}


def ray_scorer(recipe: DetectorRecipe, options: RayOptions) -> Any:
    """``make_scorer(settings)`` for :class:`clipfusion.tasks.predict.Engine`: batches scored on Ray."""
    ray = connect(options, spare_cpus=2 * STAGE_CPUS)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # predict shows its own bar, per image
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution plans and progress-bar notes

    stage_tasks = STAGE_TASKS_PER_WORKER * options.workers

    def make_scorer(settings: RowSettings) -> Scorer:
        def score(batches: Sequence[Sequence[str]]) -> Iterator[list[Outcome]]:
            if not batches:
                return
            items = [{"batch": index, "sources": list(batch)} for index, batch in enumerate(batches)]
            dataset = (ray.data.from_items(items, override_num_blocks=len(items))
                       .map(_decode, fn_kwargs={"max_pixels": settings.max_pixels}, num_cpus=STAGE_CPUS,
                            memory=DECODE_MEMORY, concurrency=stage_tasks)
                       .map(ScoringActor, fn_constructor_args=(recipe, settings.category),
                            compute=ray.data.ActorPoolStrategy(size=options.workers),
                            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)
                       .map(_render, fn_kwargs={"settings": settings}, num_cpus=STAGE_CPUS,
                            concurrency=stage_tasks))
            # Batches arrive as they finish (a retried one late); they are handed on in their order.
            waiting: dict[int, list[Outcome]] = {}
            following = 0
            for row in dataset.iter_rows():
                waiting[row["batch"]] = pickle.loads(row["payload"])
                while following in waiting:
                    yield waiting.pop(following)
                    following += 1
        return score

    return make_scorer
