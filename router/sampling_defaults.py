"""A model's own sampling defaults, from its ``generation_config.json``, for the fields a request leaves unset.

As vLLM's server does (``--generation-config auto``): a Qwen3 checkpoint ships temperature 0.6, top_p 0.95 and
top_k 20, and a client that sends none of them gets those, not 1.0 / 1.0 / off. The fields read are vLLM's:
``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``min_p`` and ``max_new_tokens`` (as
``max_tokens``). A field the request sets always wins. ``--generation-config none`` turns this off.

Each default is checked at start-up as a request's field would be: one that no request could carry is logged and
left out (the router still starts), so a client is never refused for a value it did not send.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pdserve.protos import pdserve_pb2 as pb
from pdserve.serving.convert import sampling_from_proto

logger = logging.getLogger(__name__)

FIELDS = {  # generation_config.json key -> SamplingParams field
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
    "min_p": "min_p", "max_new_tokens": "max_tokens",
}
MODES = ("auto", "none")


def load_defaults(model_dir: str | Path, name: str = "") -> pb.SamplingParams:
    """The defaults ``model_dir``'s generation_config.json sets (an empty message when it has none)."""
    msg = pb.SamplingParams()
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return msg
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("model %s: %s is unreadable (%s); no sampling defaults from it", name, path, e)
        return msg
    if not isinstance(cfg, dict):
        return msg
    for theirs, ours in FIELDS.items():
        value = cfg.get(theirs)
        if value is None:
            continue
        try:
            one = pb.SamplingParams(**{ours: value})
            sampling_from_proto(one)
        except (TypeError, ValueError) as e:  # a wrong type, out of range, or over the proto's int32
            logger.warning("model %s: generation_config.json %s=%r is not a usable default (%s); ignored",
                           name, theirs, value, e)
            continue
        msg.MergeFrom(one)
    if msg.ListFields():
        logger.info("model %s: sampling defaults from generation_config.json for requests that leave them unset: %s",
                    name, ", ".join(f"{f.name}={v}" for f, v in msg.ListFields()))
    return msg


def with_defaults(msg: pb.SamplingParams, defaults: pb.SamplingParams | None) -> pb.SamplingParams:
    """``msg`` with each field it leaves unset taken from ``defaults``."""
    if defaults is None or not defaults.ListFields():
        return msg
    merged = pb.SamplingParams()
    merged.CopyFrom(defaults)
    merged.MergeFrom(msg)  # the fields msg sets (every SamplingParams scalar tracks presence) win
    return merged
