"""Delta compression: codecs, a safe wire format, error feedback, fused decode-and-aggregate.

``encode(update, codec) -> bytes`` and ``decode(payload) -> update`` (codecs fp16, bf16, int8,
int4, topk; see :mod:`.codecs`; ``decode_flat(payload, out=buffer)`` decodes into a reused
float32 buffer); :class:`PayloadError` is the one exception type decoding raises for bad bytes
(:mod:`.wire`, docs/wire-format.md); :class:`Compressor` keeps a client's error-feedback residual
(:mod:`.feedback`); :func:`aggregate` runs any rule over ``n`` payloads, decoding inside the
kernels or block by block, never ``n`` dense updates (:mod:`.fused`).
"""

from .codecs import decode, decode_flat, encode
from .feedback import Compressor
from .fused import Compressed, aggregate
from .wire import CODECS, PayloadError

__all__ = ["encode", "decode", "decode_flat", "aggregate", "Compressor", "Compressed", "PayloadError", "CODECS"]
