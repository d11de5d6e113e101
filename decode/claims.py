"""Who owns each request id on a decode worker (see decode/service.py's docstring for the rules)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError


@dataclass(eq=False, slots=True)
class Claim:
    """Who holds a request id here, and how far it got; compared by identity (each call knows its own)."""

    principal: str
    reserved: bool  # True: a Reserve made it and no Decode call has taken it yet


class ClaimBook:
    def __init__(self):
        self._claims: dict[str, Claim] = {}

    def get(self, rid: str) -> Claim | None:
        return self._claims.get(rid)

    def __contains__(self, rid: str) -> bool:
        return rid in self._claims

    def __len__(self) -> int:
        return len(self._claims)

    def claim(self, rid: str, principal: str, reserved: bool) -> Claim:
        """Take ``rid`` for ``principal``; an id in use is refused and its owner's request left alone."""
        if not rid:
            raise InvalidRequestError("request_id: must not be empty")
        if rid in self._claims:
            raise InvalidRequestError(f"request_id: {rid!r} is in use on this worker")
        claim = self._claims[rid] = Claim(principal, reserved)
        return claim

    def drop(self, rid: str, claim: Claim) -> bool:
        """Forget ``claim`` if it still holds ``rid``; True if it did (then its owner's cleanup is ours to do)."""
        if self._claims.get(rid) is claim:
            del self._claims[rid]
            return True
        return False

    def for_decode(self, rid: str, principal: str, into_reservation: bool) -> Claim:
        """A Decode into a reservation (prefilled, no prefill address) takes over the caller's own reservation;
        any other Decode claims a fresh id."""
        if not into_reservation:
            return self.claim(rid, principal, reserved=False)
        claim = self._claims.get(rid)
        if claim is None or claim.principal != principal:
            raise RequestNotFoundError(f"request_id: no reservation {rid[:256]!r} of yours here")
        if not claim.reserved:
            raise InvalidRequestError(f"request_id: {rid!r} is in use on this worker")
        claim.reserved = False
        return claim
