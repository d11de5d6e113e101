"""The KV-layer connector an engine is given at construction.

A connector sees each step's scheduled sequences before the model runs and may return a "layer ready"
callback: the engine calls it with the layer index right after that layer's new K/V is written to the paged
cache, so a caller (e.g. a prefill worker pushing KV to a decode worker) overlaps its work with the
remaining layers. It runs on the engine thread. The engine knows nothing of what the connector does with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pdserve.engine.scheduler import ScheduledSeq

LayerReady = Callable[[int], None]


@runtime_checkable
class KVConnector(Protocol):
    def layer_ready(self, scheduled: list[ScheduledSeq]) -> LayerReady | None:
        """The callback for this step's layers, or None when the step concerns the connector not at all."""
        ...
