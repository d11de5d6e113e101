"""Same-host CUDA data plane: the sender copies straight into the receiver's KV cache through CUDA IPC.

Why: between two processes on one GPU (or on GPUs of one host), a message transport pays per-message
costs (UCX's cuda_ipc maps the peer's memory per message, plus a round trip through its progress thread
per payload); a device-to-device copy pays only bandwidth. So, like the host shared-memory path (tcp.py),
an authenticated sender on the same host is offered the receiver's cache itself:

- the receiver exports every layer tensor with torch's CUDA IPC reduction (``reduce_tensor``: an IPC
  memory handle of the allocation, the offset, and torch's cross-process ref counter), JSON-encoded in
  HELLO_OK's extras; the handshake (control.py) sends extras only to a peer whose proof verified, bound to
  this connection, and only when the peer reports this machine's host id;
- the sender opens the handles once per connection and, per pushed layer, enqueues ``copy_`` of each run of
  blocks on its own CUDA stream (after the layer's "ready" event), waits for that stream, then sends a
  small NOTIFY frame; the receiver checks NOTIFY against its reservation exactly as for the shm path.

Trust is the shm path's: a peer holding the mapping could write anywhere in the cache, so it is offered
only to authenticated peers on this host. Checksums and fault injection need host copies, so senders that
use either stream instead. Any failure to open the handles falls back to the backend's own data plane.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PATH = "cuda_ipc"
_TENSOR_CLASSES = {"torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter}


def _storage_classes() -> dict[str, type]:
    out = {"torch.storage.UntypedStorage": torch.UntypedStorage, "torch.UntypedStorage": torch.UntypedStorage}
    out["torch.storage.TypedStorage"] = torch.storage.TypedStorage
    return out


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value):
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, type):
        return {"cls": _name(value)}
    if isinstance(value, tuple | list | torch.Size):
        return {"seq": [_encode(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cuda_ipc: cannot encode {type(value).__name__}")


def _decode(value, field: int):
    """Inverse of ``_encode``, accepting only the types a CUDA tensor reduction holds."""
    if not isinstance(value, dict):
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise ValueError(f"cuda_ipc: field {field}: unexpected {type(value).__name__}")
    if "bytes" in value:
        return bytes.fromhex(str(value["bytes"]))
    if "dtype" in value:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"cuda_ipc: field {field}: unknown dtype {value['dtype']!r}")
        return dtype
    if "cls" in value:
        cls = {**_TENSOR_CLASSES, **_storage_classes()}.get(str(value["cls"]))
        if cls is None:
            raise ValueError(f"cuda_ipc: field {field}: class {value['cls']!r} is not allowed")
        return cls
    if "seq" in value:
        return tuple(_decode(v, field) for v in value["seq"])
    raise ValueError(f"cuda_ipc: field {field}: unexpected object")


def export_layers(layers: list[torch.Tensor]) -> dict:
    """HELLO_OK extras offering ``layers`` (CUDA tensors) to a same-host sender; {} for CPU caches."""
    if not layers or not layers[0].is_cuda:
        return {}
    from torch.multiprocessing.reductions import reduce_tensor

    handles = []
    for t in layers:
        rebuild, args = reduce_tensor(t)
        if rebuild.__name__ != "rebuild_cuda_tensor":
            return {}
        handles.append([_encode(a) for a in args])
    return {PATH: handles}


def open_layers(extra: dict, like: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The receiver's layers as tensors in this process, or None when not offered or not usable (the caller
    then streams). ``like`` (the sender's own layers) gives the shapes and dtype they must match."""
    handles = extra.get(PATH)
    if not handles or not like or not like[0].is_cuda:
        return None
    if not isinstance(handles, list) or len(handles) != len(like):
        logger.warning("cuda_ipc: receiver offered %s layers, expected %d; streaming instead",
                       len(handles) if isinstance(handles, list) else "malformed", len(like))
        return None
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    out = []
    try:
        for fields, mine in zip(handles, like, strict=True):
            if not isinstance(fields, list):
                raise ValueError("cuda_ipc: malformed layer handle")
            args = [_decode(v, i) for i, v in enumerate(fields)]
            if args[0] not in _TENSOR_CLASSES.values():
                raise ValueError("cuda_ipc: not a tensor")
            t = rebuild_cuda_tensor(*args)
            if t.dtype != mine.dtype or t.shape[1:] != mine.shape[1:] or not t.is_contiguous():
                raise ValueError(f"cuda_ipc: layer {len(out)} is {tuple(t.shape)} {t.dtype}, "
                                 f"expected [*, {', '.join(map(str, mine.shape[1:]))}] {mine.dtype}")
            out.append(t)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: CUDA refused the handle
        logger.warning("cuda_ipc: cannot open the receiver's KV cache (%s); streaming instead", e)
        return None
    return out


class IpcCopier:
    """The sender's copy engine: one CUDA stream, runs of blocks copied device to device."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst_layer: torch.Tensor, src_layer: torch.Tensor, runs, ready=None) -> None:
        """Copy each (src_start, dst_start, n) run and return once the bytes have landed."""
        if ready is not None:
            self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            for s, d, n in runs:
                dst_layer[d : d + n].copy_(src_layer[s : s + n], non_blocking=True)
        self.stream.synchronize()
