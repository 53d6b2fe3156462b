"""The settings of `moekd data synth`."""

from __future__ import annotations

from dataclasses import dataclass

from moekd.options import option


@dataclass
class SynthOptions:
    out: str = option(help="Directory to write train.jsonl, valid.jsonl, test.jsonl and synth_info.json into.")
    seed: int = option(0, "Generator seed; the same seed writes byte-identical files.")
    n_train: int = option(2000, "Records in train.jsonl (families balanced).")
    n_valid: int = option(200, "Records in valid.jsonl.")
    n_test: int = option(400, "Records in test.jsonl.")
