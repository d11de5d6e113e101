"""UCX backend (ucxx): control frames and KV payloads over one UCX endpoint per link, host or CUDA memory.

UCX picks the transport: cuda_ipc between processes on one GPU, RDMA between hosts, tcp/posix here.
Transports are always set explicitly (``engine.env.ucx_tls()``, default "tcp,self"; cuda_copy,cuda_ipc are
added for CUDA caches) before ucxx is first imported, because UCX's defaults hang on some hosts; ucxx is
imported lazily, so the other backends never need it. CUDA cache tensors are sent and received as they
are (ucxx takes the CUDA array interface).

The ucxx asyncio API runs on one event-loop thread per process; the public methods stay synchronous and
bridge with ``run_coroutine_threadsafe(...).result(timeout)``, every await wrapped in ``wait_for``. The
shared socket control plane runs over ``UcxStream``: each control frame is one UCX message preceded by an
8-byte length message that is checked against ``wire.MAX_CONTROL_FRAME`` before anything is allocated.
Each KV payload is one more message, sent from the source view and received straight into the
destination view (one per run of blocks consecutive on both sides). The sender posts a layer's messages
without waiting for them to complete, so UCX moves one layer while the next is pushed; the DONE frame
waits for every posted send.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import threading

import torch

from pdserve.engine import env
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import TransferError
from pdserve.kvtransfer.connection import Connection, Tx
from pdserve.kvtransfer.receiver import Link, SocketReceiver
from pdserve.kvtransfer.sender import SocketSender
from pdserve.kvtransfer.views import byte_view, is_one_run, pair_runs

logger = logging.getLogger(__name__)

_RUNTIME_LOCK = threading.Lock()
_LEN = struct.Struct("<Q")
MAX_INFLIGHT_POSTS = 64


def transports(cuda: bool) -> str:
    """UCX_TLS for this process: the configured list, plus CUDA copies when the cache is on a GPU."""
    tls = env.ucx_tls()
    if cuda and tls != "all" and "cuda" not in tls:
        tls += ",cuda_copy,cuda_ipc"
    return tls


def ucx_loop(cuda: bool = False) -> asyncio.AbstractEventLoop:
    """The process's ucxx event loop (started on first use). ucxx keeps one context and worker per process,
    so this is process-wide by necessity; it is created once and never mutated. The first caller's
    ``cuda`` decides the transports."""
    with _RUNTIME_LOCK:
        if _start_runtime.cache_info().currsize == 0:
            os.environ["UCX_TLS"] = transports(cuda)  # must precede the first import of ucxx
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        return _start_runtime()


@functools.cache
def _start_runtime() -> asyncio.AbstractEventLoop:
    try:
        import ucxx  # noqa: F401
    except ImportError as e:
        msg = f"the ucx backend needs ucxx (pip install ucxx-cu13), which failed to import: {e}"
        raise TransferError(msg) from None
    logger.info("ucxx started with UCX_TLS=%s", os.environ.get("UCX_TLS"))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="ucx-loop", daemon=True).start()
    return loop


def _buffer(t: torch.Tensor):
    """What ucxx sends from / receives into: the tensor itself on CUDA, a byte view on CPU."""
    return t if t.is_cuda else byte_view(t)


class UcxStream:
    """A blocking, socket-like stream over a ucxx endpoint: enough for the shared control plane."""

    def __init__(self, ep, loop: asyncio.AbstractEventLoop, timeout_s: float, peer: str = ""):
        self.ep = ep
        self.loop = loop
        self.timeout_s = timeout_s
        self.peer = peer
        self.buf = bytearray()
        self.pending = None  # the in-flight receive of the next control message
        self.inflight: list = []  # posted sends not yet waited on (one sending thread per stream)
        self.closed = False

    def _run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self.timeout_s), self.loop)
        try:
            return fut.result(self.timeout_s + 1)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError("UCX operation timed out") from None
        except Exception as e:  # noqa: BLE001 - ucxx raises its own exception types
            raise ConnectionError(f"UCX endpoint failed: {e}") from None

    async def _recv_message(self) -> bytes:
        head = bytearray(_LEN.size)
        await self.ep.recv(head)
        (n,) = _LEN.unpack(head)
        if n > wire.MAX_CONTROL_FRAME:
            raise wire.WireError(f"control message of {n} bytes over the {wire.MAX_CONTROL_FRAME} cap")
        body = bytearray(n)
        if n:
            await self.ep.recv(body)
        return bytes(body)

    async def _send_all(self, bufs: list) -> None:
        # ep.send posts its UCX request before its first await, and tasks start in creation order, so the
        # messages go out in list order, and in call order across posts (every send goes through here)
        await asyncio.gather(*[asyncio.ensure_future(self.ep.send(b)) for b in bufs])

    def post(self, bufs: list) -> None:
        """Post sends of ``bufs`` (in order) without waiting for them to complete; ``flush`` waits. The
        buffers must stay alive and unchanged until then (a pushed layer's blocks do, until finish)."""
        if self.closed:
            raise ConnectionError("UCX stream closed")
        self.inflight.append(asyncio.run_coroutine_threadsafe(self._send_all(bufs), self.loop))
        while len(self.inflight) > MAX_INFLIGHT_POSTS:
            self._wait(self.inflight.pop(0))

    def flush(self) -> None:
        """Wait until every posted send completed."""
        while self.inflight:
            self._wait(self.inflight.pop(0))

    def _wait(self, fut) -> None:
        try:
            fut.result(self.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError("UCX send timed out") from None
        except Exception as e:  # noqa: BLE001 - ucxx raises its own exception types
            raise ConnectionError(f"UCX endpoint failed: {e}") from None

    @staticmethod
    def message(data: bytes) -> list[bytearray]:
        """A control message as UCX sends: its 8-byte length, then the bytes."""
        return [bytearray(_LEN.pack(len(data))), bytearray(data)] if data else [bytearray(_LEN.pack(0))]

    # ---- the socket API the control plane uses -------------------------------------------------------
    def settimeout(self, t) -> None:
        if t:
            self.timeout_s = t

    def getsockname(self) -> tuple[str, int]:
        return ("", 0)

    def sendall(self, data) -> None:
        self.post(self.message(bytes(data)))
        self.flush()

    def readable(self, timeout: float) -> bool:
        if self.closed:
            raise ConnectionError("UCX stream closed")
        if self.buf:
            return True
        if self.pending is None:
            self.pending = asyncio.run_coroutine_threadsafe(self._recv_message(), self.loop)
        try:
            data = self.pending.result(timeout)
        except TimeoutError:
            return False
        except wire.WireError:
            raise
        except Exception as e:  # noqa: BLE001 - ucxx raises its own exception types
            raise ConnectionError(f"UCX endpoint failed: {e}") from None
        self.pending = None
        self.buf += data
        return True

    def recv_into(self, view, n: int) -> int:
        if not self.buf and not self.readable(self.timeout_s):
            raise TimeoutError("UCX receive timed out")
        k = min(n, len(self.buf))
        view[:k] = self.buf[:k]
        del self.buf[:k]
        return k

    # ---- payloads ----------------------------------------------------------------------------------
    def recv_raw(self, buf) -> None:
        if self.buf:
            raise wire.WireError("payload expected, but control bytes are pending")
        self._run(self.ep.recv(buf))

    def shutdown(self, how=None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:
            self.pending.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self.ep.close(), self.loop).result(2)
        except Exception:  # noqa: BLE001 - best effort on an endpoint that may be dead already
            logger.debug("closing UCX endpoint to %s failed", self.peer)


class UcxReceiver(SocketReceiver):
    scheme = "ucx"
    data_path = "ucx"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, None)
        self._loop = ucx_loop(layers[0].is_cuda)  # raises TransferError if ucxx is missing
        self._ucx_listener = None

    def start(self) -> str:
        import ucxx

        loop = self._loop

        async def on_connect(ep) -> None:
            stream = UcxStream(ep, loop, self.config.timeout_s, "ucx peer")
            done = asyncio.Event()

            def serve() -> None:
                try:
                    self.serve(stream, "ucx peer")
                finally:
                    loop.call_soon_threadsafe(done.set)

            threading.Thread(target=serve, name="kv-ucx-rx", daemon=True).start()
            await done.wait()

        async def make():
            return ucxx.create_listener(on_connect, port=self.config.port or None)

        fut = asyncio.run_coroutine_threadsafe(make(), loop)
        self._ucx_listener = fut.result(self.config.timeout_s)
        return self.bind_names(self.config.host, self._ucx_listener.port)

    def close(self) -> None:
        super().close()  # closes every link's endpoint and waits for its serving thread
        if self._ucx_listener is not None:
            self._ucx_listener.close()

    def close_link(self, link: Link) -> None:
        link.sock.close()

    def check_frame(self, link: Link, frame: wire.Frame) -> None:
        if frame.type == wire.DATA and not is_one_run(frame.block_ids):
            raise wire.WireError("ucx DATA frames carry one run of consecutive blocks")

    def receive_payload(self, link: Link, frame: wire.Frame) -> None:
        start, n = frame.block_ids[0], len(frame.block_ids)
        link.sock.recv_raw(_buffer(self.layers[frame.layer][start : start + n]))

    def drop_payload(self, link: Link, frame: wire.Frame) -> None:
        # bounded: _check capped the frame at the cache's block count (UCX must receive it whole)
        link.sock.recv_raw(bytearray(frame.payload_len))


class UcxSender(SocketSender):
    scheme = "ucx"

    def __init__(self, layers, fingerprint, config):
        super().__init__(layers, fingerprint, config)
        self._loop = ucx_loop(layers[0].is_cuda)  # raises TransferError if ucxx is missing

    def connect(self, host: str, port: int) -> UcxStream:
        import ucxx

        coro = ucxx.create_endpoint(host, port, connect_timeout=self.config.timeout_s)
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self.config.timeout_s), self._loop)
        try:
            ep = fut.result(self.config.timeout_s + 1)
        except Exception as e:  # noqa: BLE001 - ucxx raises its own exception types
            fut.cancel()
            raise OSError(f"UCX connect failed: {e}") from None
        return UcxStream(ep, self._loop, self.config.timeout_s, f"{host}:{port}")

    def on_connected(self, conn: Connection) -> None:
        if not self.open_cuda_ipc(conn):  # same host, CUDA caches: copy straight into the receiver's cache
            conn.path = "ucx"

    def send_layer(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int]) -> None:
        """Posts each run's header and payload and returns without waiting for completion, so a layer's
        transfer overlaps the next push; the DONE frame (a sendall) waits for every posted send."""
        stream: UcxStream = conn.sock
        src_layer = self.layers[layer]
        for s, d, n in pair_runs(src, dst):
            view = src_layer[s : s + n]
            crc, flags = self.checksum([view])
            frame = wire.Frame(wire.DATA, tx.transfer_id, layer, list(range(d, d + n)), n * self.block_bytes,
                               crc, flags)
            stream.post([*stream.message(wire.encode_header(frame)), _buffer(self.payload(view))])
            tx.num_frames += 1
            tx.num_bytes += n * self.block_bytes
