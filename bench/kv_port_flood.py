"""Attacks on the KV port (issue 15, holes 3 and 7), measured through kvtransfer's public API and raw sockets.

    python -m bench.kv_port_flood                 # every attack, a table
    python -m bench.kv_port_flood --json out.json

- ``relay``: a real sender (holding the cluster secret) is made to dial the attacker, who splices the
  connection onto its own connection to the real receiver (a byte-for-byte relay). Reported: whether the
  sender got through and whether the receiver's shared-memory path reached the attacker.
- ``idle flood``: N idle connections (from 1 or 50 loopback source addresses), then one real transfer:
  its time (or the refusal), and how many flood connections the receiver still holds 1 s and 3 s later.
- ``active flood``: two attacker processes reconnecting as fast as they can and leaving each connection
  idle, while a real sender opens a fresh connection (a full handshake) again and again for 3 s (at least
  20 times): successes, the slowest, and the attackers' connection rate.
- ``slow-loris``: a handshake that trickles one byte every 0.2 s, and one that never speaks: the time
  until the receiver cuts it (capped at 10 s).

Receiver config: the production defaults (``timeout_s`` 30) with a cluster secret; tcp backend, on a
shared-memory cache so the same-host path is on offer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import select
import socket
import statistics
import threading
import time

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint
from pdserve.kvtransfer import TransferConfig, TransferError, make_receiver, make_sender, wire

SECRET = "bench-cluster-secret"
SPEC = KVCacheSpec(4, 64, 16, 2, 8, torch.float32, "cpu")
FP = LayoutFingerprint("bench", "main", 4, 2, 8, 16, "float32", 0)
BLOCKS = list(range(8))
CAP_S = 10.0


def _config(timeout_s: float = 30.0) -> TransferConfig:
    return TransferConfig(backend="tcp", secret=SECRET, timeout_s=timeout_s, allow_shm=True)


def _hostport(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.partition("://")[2].rpartition(":")
    return host, int(port)


def _transfer(r, ep: str, src: KVCache, tid: str, timeout_s: float = 5.0) -> float | str:
    """One real transfer with a fresh sender (so a fresh handshake): seconds, or the error."""
    s = make_sender(_config(timeout_s), src.layers, FP)
    r.expect(tid, BLOCKS)
    t0 = time.monotonic()
    try:
        h = s.open(tid, ep, BLOCKS)
        for layer in range(SPEC.num_layers):
            h.push_layer(layer, BLOCKS, BLOCKS)
        h.finish(timeout_s)
        r.wait(tid, timeout_s)
        return time.monotonic() - t0
    except TransferError as e:
        r.cancel(tid)
        return f"{type(e).__name__}: {e}"
    finally:
        s.close()


def _cut(sock: socket.socket) -> bool:
    while True:
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return False
        try:
            if not sock.recv(1 << 16):
                return True
        except OSError:
            return True


class Receiver:
    def __enter__(self):
        self.cache = KVCache(SPEC, shared=True)
        self.r = make_receiver(_config(), self.cache.layers, FP, self.cache.shm_path)
        self.ep = self.r.start()
        self.src = KVCache(SPEC)
        return self

    def __exit__(self, *exc):
        self.r.close()
        self.cache.close()


def relay() -> dict:
    with Receiver() as rx:
        ls = socket.create_server(("127.0.0.1", 0))
        said = bytearray()

        def splice() -> None:
            victim, _ = ls.accept()
            up = socket.create_connection(_hostport(rx.ep), timeout=5)

            def pump(a, b, record: bytearray | None) -> None:
                try:
                    while data := a.recv(1 << 16):
                        if record is not None:
                            record += data
                        b.sendall(data)
                except OSError:
                    pass
                for sock in (a, b):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            threading.Thread(target=pump, args=(victim, up, None), daemon=True).start()
            pump(up, victim, said)

        th = threading.Thread(target=splice, daemon=True)
        th.start()
        result = _transfer(rx.r, f"tcp://127.0.0.1:{ls.getsockname()[1]}", rx.src, "relayed")
        th.join(5)
        ls.close()
        return {"sender through the relay": "got through" if isinstance(result, float) else "refused",
                "shm_path leaked to the relay": rx.cache.shm_path.encode() in said}


def idle_flood(num: int, num_sources: int) -> dict:
    with Receiver() as rx:
        host, port = _hostport(rx.ep)
        flood = []
        for i in range(num):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % num_sources}", 0))
            s.connect((host, port))
            flood.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        result = _transfer(rx.r, rx.ep, rx.src, "real")
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        held_1s = sum(not _cut(f) for f in flood)
        time.sleep(2.0)
        held_3s = sum(not _cut(f) for f in flood)
        for f in flood:
            f.close()
        return {"real transfer": round(result, 4) if isinstance(result, float) else result,
                "held after 1 s": held_1s, "held after 3 s": held_3s}


def _attacker(host: str, port: int, stop, opened) -> None:
    """Child process: reconnect as fast as possible, leaving each connection idle (the last 500 kept)."""
    mine: list[socket.socket] = []
    while not stop.is_set():
        try:
            mine.append(socket.create_connection((host, port), timeout=1))
            with opened.get_lock():
                opened.value += 1
        except OSError:
            time.sleep(0.01)
        if len(mine) > 500:
            mine.pop(0).close()


def active_flood(num_attackers: int = 2, rounds: int = 20) -> dict:
    ctx = mp.get_context("spawn")
    with Receiver() as rx:
        stop, opened = ctx.Event(), ctx.Value("l", 0)
        procs = [ctx.Process(target=_attacker, args=(*_hostport(rx.ep), stop, opened), daemon=True)
                 for _ in range(num_attackers)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 60
        while opened.value < 1000 and time.monotonic() < deadline:  # the attackers are up and churning
            time.sleep(0.1)
        t0, before, results = time.monotonic(), opened.value, []
        while len(results) < rounds or time.monotonic() - t0 < 3.0:  # at least 3 s under attack
            results.append(_transfer(rx.r, rx.ep, rx.src, f"real{len(results)}", 5.0))
        rate = (opened.value - before) / (time.monotonic() - t0)
        stop.set()
        for proc in procs:
            proc.join(5)
        ok = [x for x in results if isinstance(x, float)]
        return {"successes": f"{len(ok)}/{len(results)}", "median s": round(statistics.median(ok), 4) if ok else None,
                "slowest s": round(max(ok), 4) if ok else None, "attacker connections/s": round(rate),
                "first error": next((x for x in results if isinstance(x, str)), None)}


def slow_loris(trickle: bool) -> dict:
    with Receiver() as rx:
        sock = socket.create_connection(_hostport(rx.ep), timeout=5)
        t0 = time.monotonic()
        body = b'{"fingerprint": "' + b"x" * 1000 + b'"}'
        hello = wire.encode_header(wire.Frame(wire.HELLO, payload_len=len(body))) + body  # a well-formed HELLO
        cut_at, i = None, 0
        while time.monotonic() - t0 < CAP_S:
            if trickle:
                try:
                    sock.sendall(hello[i : i + 1])  # ... one byte at a time
                    i += 1
                except OSError:
                    pass
            r, _, _ = select.select([sock], [], [], 0.2)
            if r and _cut(sock):
                cut_at = time.monotonic() - t0
                break
        sock.close()
        return {"cut after s": round(cut_at, 2) if cut_at is not None else f"> {CAP_S:g} (still open)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=300, help="idle flood connections")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args()
    out = {
        "relay": relay(),
        f"idle flood x{a.num}, 1 source": idle_flood(a.num, 1),
        f"idle flood x{a.num}, 50 sources": idle_flood(a.num, 50),
        "active flood (2 reconnecting attacker processes)": active_flood(),
        "slow-loris, 1 byte / 0.2 s": slow_loris(True),
        "slow-loris, silent": slow_loris(False),
    }
    print("| attack | result |\n|---|---|")
    for attack, result in out.items():
        print(f"| {attack} | " + "; ".join(f"{k}: {v}" for k, v in result.items()) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
