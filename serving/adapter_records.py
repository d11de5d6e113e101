"""A worker's record of the adapters loaded through the router's Admin API, so that routers stay stateless.

Each ``Admin.LoadAdapter`` call gets a version from the router that ran it. The worker keeps (name, path,
version) for every adapter loaded that way, and a tombstone for each version unloaded since, and reports both
in ``WorkerLoad.api_adapters``. Any router, a restarted one or another replica, rebuilds from these what its
pools should hold and loads it on workers that join later (router.adapters); a tombstone stops every router
from loading that version again, and a worker refuses a load of a tombstoned version outright, so an unload
racing another router's catch-up load leaves no adapter behind. Adapters loaded by ``--lora`` at start have
no version and are not recorded: a worker that joins gets them from its own flags.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pdserve.engine.errors import PreconditionError

MAX_TOMBSTONES = 256


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    path: str
    version: str
    unloaded: bool = False  # a tombstone


class AdapterRecords:
    def __init__(self) -> None:
        self.live: dict[str, AdapterRecord] = {}
        self.tombstones: OrderedDict[tuple[str, str], AdapterRecord] = OrderedDict()

    def check_load(self, name: str, version: str) -> None:
        """PreconditionError when this version of ``name`` was unloaded here."""
        if version and (name, version) in self.tombstones:
            raise PreconditionError(f"adapter {name!r} (version {version[:32]}) was unloaded; load it anew through "
                                    "Admin.LoadAdapter")

    def loaded(self, name: str, path: str, version: str) -> None:
        if version:
            self.live[name] = AdapterRecord(name, path, version)
        else:  # a local load under this name replaces whatever the API loaded
            self._bury(self.live.pop(name, None))

    def unloaded(self, name: str, version: str) -> None:
        """``name`` was unloaded (``version``: the router's, tombstoned even if never loaded here)."""
        rec = self.live.pop(name, None)
        self._bury(rec)
        if version and (rec is None or rec.version != version):
            self._bury(AdapterRecord(name, "", version))

    def _bury(self, rec: AdapterRecord | None) -> None:
        if rec is None:
            return
        self.tombstones[(rec.name, rec.version)] = AdapterRecord(rec.name, rec.path, rec.version, unloaded=True)
        self.tombstones.move_to_end((rec.name, rec.version))
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    def all(self) -> list[AdapterRecord]:
        return [*self.live.values(), *self.tombstones.values()]
