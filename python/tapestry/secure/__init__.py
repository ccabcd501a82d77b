"""Secure sum: the server learns only the total of the clients' updates (docs/spec.md, "Secure sum").

* :func:`chacha20_keystream`, :func:`chacha20_mask`: the ChaCha20 PRG (RFC 8439) on every backend.
* :class:`FixedPoint`: floats into Z_2^32 / Z_2^64 without overflow of the sum.
* :class:`Client`, :class:`Server`: the protocol as message-passing state machines (bytes in,
  bytes out), Bonawitz et al. 2017 double masking with the SecAgg+ neighbour graph option.
* :func:`simulate_round`: a whole round in-process; :func:`secure_sum` for the training loop.
* :class:`.ranks.MaskedSum`: the pairwise-masked sum over torch.distributed ranks, every rank
  alive (``tapestry train --dp distributed``).
"""

from .crypto import ProtocolError
from .fixedpoint import FixedPoint, clip_norm
from .messages import Message, parse
from .prg import NONCE_MASK, chacha20_keystream, chacha20_mask
from .client import Client
from .protocol import check_parameters
from .server import Server
from .simulate import RoundInfo, secure_sum, simulate_round

__all__ = ["ProtocolError", "FixedPoint", "clip_norm", "Message", "parse", "NONCE_MASK", "chacha20_keystream",
           "chacha20_mask", "Client", "Server", "check_parameters", "RoundInfo", "secure_sum", "simulate_round"]
