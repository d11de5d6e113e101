"""UCX backend (ucxx): control frames and KV payloads over UCX endpoints, host or CUDA memory.

UCX picks the transport: cuda_ipc between processes on one GPU (measured ~910 GB/s on an H100), RDMA
between hosts, tcp/posix here. Transports are always set explicitly (``PDSERVE_UCX_TLS``, default
"tcp,self") because UCX's defaults hang on some hosts, and every wait has a timeout.

The ucxx asyncio API runs on one event-loop thread per process (ucxx keeps one worker per process). The
socket backend's control plane is reused through ``UcxStream``, a small blocking stream over an endpoint:
control frames travel as size-prefixed UCX messages; each KV payload is one UCX message sent from the
source view and received straight into the destination view (one message per run of blocks that is
consecutive on both sides).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from engine import env
from kvtransfer import wire
from kvtransfer.base import TransferError
from kvtransfer.tcp import SocketReceiver, SocketSender, _Conn, _Tx, byte_view, pair_runs

logger = logging.getLogger(__name__)

_LOOP_LOCK = threading.Lock()
_LOOP: asyncio.AbstractEventLoop | None = None  # the process's one ucxx event loop (ucxx is per-process)


def ucx_loop() -> asyncio.AbstractEventLoop:
    """Import ucxx (with explicit transports) and start its event-loop thread once per process."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            os.environ.setdefault("UCX_TLS", env.ucx_tls())
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
            try:
                import ucxx  # noqa: F401
            except ImportError as e:
                raise TransferError(f"the ucx backend needs ucxx (pip install ucxx-cu13): {e}") from None
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="ucx-loop", daemon=True).start()
            _LOOP = loop
        return _LOOP


def _buffer(t):
    """What ucxx sends from / receives into: the tensor itself on CUDA, a numpy view on CPU."""
    return t if t.is_cuda else byte_view(t)


class UcxStream:
    """A blocking byte stream over a ucxx endpoint, enough for the socket backend's control plane."""

    def __init__(self, ep, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.ep = ep
        self.loop = loop
        self.timeout_s = timeout_s
        self.buf = bytearray()
        self.pending = None
        self.closed = False

    def _run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout or self.timeout_s), self.loop)
        try:
            return fut.result((timeout or self.timeout_s) + 1)
        except TimeoutError:
            raise TimeoutError("UCX operation timed out") from None
        except Exception as e:  # noqa: BLE001 - ucxx raises its own exception types
            raise ConnectionError(f"UCX endpoint failed: {e}") from None

    # socket-like API used by the control plane
    def settimeout(self, t) -> None:
        if t:
            self.timeout_s = t

    def setsockopt(self, *a) -> None:
        pass

    def sendall(self, data) -> None:
        self._run(self.ep.send_obj(bytes(data)))

    def send_raw(self, buf) -> None:
        self._run(self.ep.send(buf))

    def recv_raw(self, buf) -> None:
        self._run(self.ep.recv(buf))

    def readable(self, timeout: float) -> bool:
        if self.closed:
            raise ConnectionError("UCX stream closed")
        if self.buf:
            return True
        if self.pending is None:
            self.pending = asyncio.run_coroutine_threadsafe(self.ep.recv_obj(), self.loop)
        try:
            data = self.pending.result(timeout)
        except TimeoutError:
            return False
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"UCX endpoint failed: {e}") from None
        self.pending = None
        self.buf += bytes(data)
        return True

    def recv_into(self, view, n: int) -> int:
        if not self.buf:
            while not self.readable(self.timeout_s):
                raise TimeoutError("UCX receive timed out")
        k = min(n, len(self.buf))
        view[:k] = self.buf[:k]
        del self.buf[:k]
        return k

    def shutdown(self, how) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.ep.close(), self.loop).result(2)
        except Exception:  # noqa: BLE001 - best effort
            pass


class UcxReceiver(SocketReceiver):
    scheme = "ucx"
    data_path = "ucx"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, None)
        self._listener_ucx = None

    def start(self) -> str:
        loop = ucx_loop()  # sets the UCX environment before ucxx is imported
        import ucxx

        async def on_connect(ep) -> None:
            stream = UcxStream(ep, loop, self.config.timeout_s)
            done = asyncio.Event()

            def serve() -> None:
                try:
                    self._serve(stream)
                finally:
                    loop.call_soon_threadsafe(done.set)

            threading.Thread(target=serve, name="kv-ucx-rx", daemon=True).start()
            await done.wait()

        async def make():
            return ucxx.create_listener(on_connect, port=self.config.port or None)

        self._listener_ucx = asyncio.run_coroutine_threadsafe(make(), loop).result(self.config.timeout_s)
        return f"ucx://{self.config.host}:{self._listener_ucx.port}"

    def close(self) -> None:
        self._closed.set()
        if self._listener_ucx is not None:
            self._listener_ucx.close()
        for c in list(self._conns):
            c.close()

    def receive_payload(self, sock: UcxStream, frame: wire.Frame) -> None:
        start, n = frame.block_ids[0], len(frame.block_ids)
        if frame.block_ids != list(range(start, start + n)):
            raise wire.WireError("ucx DATA frames carry one consecutive run of blocks")
        sock.recv_raw(_buffer(self.layers[frame.layer][start : start + n]))

    def drop_payload(self, sock: UcxStream, frame: wire.Frame) -> None:
        sock.recv_raw(bytearray(frame.payload_len))


class UcxSender(SocketSender):
    scheme = "ucx"

    def map_shm(self, challenge: dict):
        return None

    def connect(self, host: str, port: int) -> UcxStream:
        loop = ucx_loop()
        import ucxx
        fut = asyncio.run_coroutine_threadsafe(
            ucxx.create_endpoint(host, port, connect_timeout=self.config.timeout_s), loop
        )
        try:
            ep = fut.result(self.config.timeout_s + 1)
        except Exception as e:  # noqa: BLE001
            raise OSError(f"UCX connect failed: {e}") from None
        return UcxStream(ep, loop, self.config.timeout_s)

    def on_connected(self, conn: _Conn) -> None:
        conn.path = "ucx"

    def send_data(self, conn: _Conn, tx: _Tx, layer: int, src: list[int], dst: list[int]) -> None:
        src_layer = self.layers[layer]
        for s, d, n in pair_runs(src, dst):
            view = src_layer[s : s + n]
            flags, crc = 0, 0
            if self.config.checksum:
                crc, flags = wire.crc32([byte_view(view.cpu() if view.is_cuda else view)]), wire.F_CHECKSUM
            frame = wire.Frame(wire.DATA, tx.transfer_id, layer, list(range(d, d + n)), n * self.block_bytes, crc, flags)
            conn.sock.sendall(wire.encode_header(frame))
            conn.sock.send_raw(_buffer(view))
            tx.num_frames += 1
