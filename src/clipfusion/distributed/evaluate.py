"""``evaluate --engine ray``: each pending (category, shots, seed) unit is a Ray task with the CPUs and
GPUs of one worker.  The worker writes the unit to ``--out/units/`` itself, as the local runner does,
so resuming, the folder lock (held by the driver) and ``results.json`` are unchanged."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from clipfusion.distributed.cluster import RayOptions, connect
from clipfusion.distributed.recipe import DetectorRecipe
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation.runner import EvaluationRunner

# A unit whose worker died (a lost node, a kill) runs again, at most this many times.
UNIT_RETRIES = 3


def _run_unit(runner: EvaluationRunner, category: str, shots: int, seed: int) -> dict[str, Any]:
    return runner.run_unit(category, shots, seed)


class RayUnits:
    """A unit engine for :meth:`EvaluationRunner.run`: at most ``workers`` units at once, each built
    from ``recipe`` on its worker (so ``auto`` device and dtype are the worker's)."""

    def __init__(self, options: RayOptions, recipe: DetectorRecipe) -> None:
        self.options, self.recipe = options, recipe
        self.ray = connect(options)

    def __call__(self, runner: EvaluationRunner, units: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.options.cpus_per_worker, num_gpus=self.options.gpus_per_worker,
                            max_retries=UNIT_RETRIES)(_run_unit)
        shipped = copy.copy(runner)
        shipped.detector_factory, shipped.progress = self.recipe.build, False
        runner_ref = ray.put(shipped)  # shipped once, not once per unit
        waiting, running = list(units), dict[Any, tuple[str, int, int]]()
        try:
            while waiting or running:
                while waiting and len(running) < self.options.workers:
                    unit = waiting.pop(0)
                    running[remote.remote(runner_ref, *unit)] = unit
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    running.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, ClipfusionError):  # the user's to fix: one line, as locally
                            raise exc.cause from None
                        raise
        finally:  # an error or Ctrl-C: the units in flight stop too (finished ones are on disk)
            for ref in running:
                ray.cancel(ref, force=True)
