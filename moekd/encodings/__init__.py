"""How teacher distributions are encoded in a store: one module per encoding, registered here.

- `topk` (topk.py): the k largest log-probs, their ids and the exact tail mass;
- `sampled` (sampled.py): n draws from r = p^t / Z_t as unique ids and counts (random-sampling KD);
- `hidden` (hidden.py): the teacher's final hidden states and its output layer, once;
- gates (gates.py): the teacher's gate distributions, stored beside any of them (--router-probs).

Each token encoding is an `Encoding` (base.py): flags, encoder, array specs, decoding, value
checks, description, and what training and `CacheReader.sparse_distribution` take from it. A new
encoding is one module with an `Encoding` subclass, listed in ENCODINGS below, and its metadata
record in moekd/schemas/cache.py (the store's schema names every encoding it can hold).
"""

from __future__ import annotations

import numpy as np

from moekd.encodings.base import Encoder, Encoding, SparseDistribution
from moekd.encodings.hidden import HIDDEN
from moekd.encodings.sampled import SAMPLED
from moekd.encodings.topk import TOPK
from moekd.errors import MoekdError

ENCODINGS: dict[str, Encoding] = {e.name: e for e in (TOPK, SAMPLED, HIDDEN)}  # by --encoding
_BY_KIND = {e.kind: e for e in ENCODINGS.values()}  # by the stored metadata's kind

__all__ = ["ENCODINGS", "Encoder", "Encoding", "SparseDistribution", "check_flags", "decode_teacher", "encoding_of"]


def encoding_of(info) -> Encoding:
    """The encoding of a store's metadata record (`meta.encoding`)."""
    return _BY_KIND[info.kind]


def check_flags(name: str, values: dict) -> dict:
    """The checked flags of `--encoding name` (BuildOptions field -> value, None: not given), defaults
    filled in; a flag of another encoding is refused."""
    if name not in ENCODINGS:
        raise MoekdError(f"--encoding: {name!r} is not {', '.join(list(ENCODINGS)[:-1])} or {list(ENCODINGS)[-1]}")
    for other in ENCODINGS.values():
        for flag, key in other.flags.items():
            if other.name != name and values.get(key) is not None:
                raise MoekdError(f"{flag} applies only to --encoding {other.name}, not --encoding {name}; drop it")
    return ENCODINGS[name].check_flags(values)


def teacher_arrays(info) -> list[str]:
    """Names of the position arrays that hold the teacher's distributions in the encoding `info` records."""
    specs = encoding_of(info).array_specs(info, 1, 1, 1)
    return [name for name, spec in specs.items() if spec.dims[0] == "position"]


def decode_teacher(info, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoded teacher arrays (CacheExample's names) from the stored ones (`teacher_arrays`)."""
    return encoding_of(info).decode(info, raw)
