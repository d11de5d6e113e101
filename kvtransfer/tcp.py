"""TCP backend: control and data over one socket per (sender, receiver) pair, plus a same-host fast path.

Data planes (chosen per connection in the handshake):
- ``tcp``: each push is one DATA frame whose payload follows the header; the sender writes straight from
  the source block views and the receiver reads straight into the destination views (no staging on CPU;
  CUDA caches are staged through host memory).
- ``shm``: when the receiver's cache lives in a /dev/shm file (``KVCache(shared=True)``), the receiver has
  ``config.allow_shm`` and the authenticated sender reports the same host id, HELLO_OK names the file. The
  sender maps it and copies blocks in directly (memcpy, large runs split over a few threads); only small
  NOTIFY frames cross the socket.
  This is the host analogue of CUDA IPC. Trust: a mapped peer could write anywhere in the cache, so only
  authenticated peers on the same machine are offered the path; the receiver still checks every NOTIFY
  against its reservation, and with ``checksum`` verifies the bytes that landed against a CRC the sender
  took over its source blocks (covering the copy itself).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdserve.engine.kv_cache import block_runs
from pdserve.kvtransfer import control, wire
from pdserve.kvtransfer.connection import Connection, Tx
from pdserve.kvtransfer.receiver import Link, SocketReceiver
from pdserve.kvtransfer.sender import SocketSender
from pdserve.kvtransfer.views import byte_rows, copy_bytes, copy_ways, pair_runs

logger = logging.getLogger(__name__)


class TcpReceiver(SocketReceiver):
    scheme = "tcp"
    data_path = "tcp"

    def welcome_extra(self, link: Link, hello: control.Hello) -> dict:
        if not (self.shm_path and self.config.allow_shm and hello.host_id == control.host_id()):
            return super().welcome_extra(link, hello)  # a CUDA cache: the cuda_ipc offer
        link.shm = True
        return {"shm_path": self.shm_path, "num_blocks": self.num_blocks}


class TcpSender(SocketSender):
    scheme = "tcp"

    def __init__(self, layers, fingerprint, config):
        super().__init__(layers, fingerprint, config)
        self._copy_pool: ThreadPoolExecutor | None = None  # helpers for large shm copies, made on first use
        self._src_rows: list[np.ndarray] | None = None  # byte views of our layers, made on first shm push
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        with self._pool_lock:
            pool, self._copy_pool = self._copy_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor | None:
        with self._pool_lock:
            if self._copy_pool is None and copy_ways() > 1:
                self._copy_pool = ThreadPoolExecutor(copy_ways() - 1, thread_name_prefix="kv-shm-copy")
            return self._copy_pool

    def on_connected(self, conn: Connection) -> None:
        if self.layers[0].is_cuda:
            super().on_connected(conn)  # cuda_ipc when offered
            return
        path = conn.welcome.get("shm_path")
        if not (path and self.config.allow_shm):
            return
        layers = self._map_shm(str(path), conn.welcome.get("num_blocks"))
        if layers is not None:
            conn.plane, conn.path = layers, "shm"

    def on_disconnected(self, conn: Connection) -> None:
        conn.plane = None  # drops the mapping

    def _map_shm(self, path: str, num_blocks) -> list[np.ndarray] | None:
        """Map the receiver's cache file as per-layer [num_blocks, block_bytes] byte arrays, or None if it is
        not what it should be."""
        if not isinstance(num_blocks, int) or num_blocks <= 0 or not path.startswith("/dev/shm/"):
            return None
        layer_bytes = num_blocks * self.block_bytes
        total = layer_bytes * len(self.layers)
        try:
            size = os.path.getsize(path)
        except OSError:
            return None  # not on this host after all: stream instead
        if size != total:
            logger.warning("shared KV cache %s has %d bytes, expected %d; streaming instead", path, size, total)
            return None
        flat = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        return [byte_rows(flat[i * layer_bytes : (i + 1) * layer_bytes].view(num_blocks, self.block_bytes))
                for i in range(len(self.layers))]

    def send_layer(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int]) -> None:
        if conn.plane is None:
            super().send_layer(conn, tx, layer, src, dst)
            return
        if self._src_rows is None:
            self._src_rows = [byte_rows(t) for t in self.layers]
        src_rows, dst_rows, pool = self._src_rows[layer], conn.plane[layer], self._pool()
        for s, d, n in pair_runs(src, dst):
            data = src_rows[s : s + n]
            if self.fault_injector is not None:
                data = byte_rows(self.payload(self.layers[layer][s : s + n]))
            copy_bytes(dst_rows[d : d + n], data, pool)
        crc, flags = 0, 0
        if self.config.checksum:  # over the source, so a bad copy is caught too
            crc, flags = wire.crc32(src_rows[s : s + n] for s, n in block_runs(src)), wire.F_CHECKSUM
        frame = wire.Frame(wire.NOTIFY, tx.transfer_id, layer, dst, 0, crc, flags)
        conn.sock.sendall(wire.encode_header(frame))
        tx.num_frames += 1
        tx.num_bytes += len(src) * self.block_bytes
