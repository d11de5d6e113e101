"""Request classes at the router: the class a priority falls in, and how much of a worker each class may fill.

Classes come from ``GenerateRequest.priority`` (higher is served first):

- ``background``: priority < 0. Batch jobs run here (``BATCH_PRIORITY``, router.batch).
- ``standard``: priority 0, the default.
- ``high``: priority > 0.

Shedding order: as load rises, the lowest class is refused first.
- Capacity bound (router.admission): a decode worker admits background work while it holds fewer than one
  batch of sequences (spare running slots only), standard work up to two batches (one running, one waiting
  behind it), and high work up to three. So a worker full of standard streams still takes high requests,
  and background work never queues behind interactive work.
- SLO shedding (``--shed-ttft-ms``): the predicted-TTFT budget is 0.5x for background, 1x for standard and
  2x for high.

On the workers the same priorities order the engine's queues and preempt (engine.priority): a high request
that got past admission takes the batch slot or the KV blocks of the lowest-ranked running request.
"""

from __future__ import annotations

from pdserve.engine.priority import BATCH_PRIORITY

CLASSES = ("background", "standard", "high")
BATCHES = {"background": 1, "standard": 2, "high": 3}  # capacity bound, in batches per decode worker
SLO_FACTOR = {"background": 0.5, "standard": 1.0, "high": 2.0}

__all__ = ["BATCHES", "BATCH_PRIORITY", "CLASSES", "SLO_FACTOR", "class_of"]


def class_of(priority: int) -> str:
    if priority < 0:
        return "background"
    return "high" if priority > 0 else "standard"
