"""Delta compression: codecs, a safe wire format, error feedback, fused decode-and-aggregate.

``encode(update, codec) -> bytes`` and ``decode(payload) -> update`` (codecs fp16, bf16, int8,
int4, topk; see :mod:`.codecs`); :class:`PayloadError` is the one exception type decoding raises
for bad bytes (:mod:`.wire`, docs/wire-format.md); :class:`Compressor` keeps a client's
error-feedback residual (:mod:`.feedback`); :func:`aggregate` runs any rule over ``n`` payloads
decoding block by block (:mod:`.fused`).
"""

from .codecs import decode, encode
from .feedback import Compressor
from .fused import Compressed, aggregate
from .wire import CODECS, PayloadError

__all__ = ["encode", "decode", "aggregate", "Compressor", "Compressed", "PayloadError", "CODECS"]
