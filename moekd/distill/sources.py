"""Where training examples come from: a teacher cache (KD) or tokenized data (SFT), checked
against the student before anything trains.

- `CacheSource`: examples and their stored teacher distributions; each loader worker process
  opens its own CacheReader.
- `TokenizedSource`: tokenized instruction data held in memory (ground truth only).
- `verify_cache` checks the store end to end (once per run: on rank 0 under torchrun);
- `open_source` opens it and checks that the student's tokenizer is the cache's;
  `check_vocabulary` that the student's output layer covers every id it will see.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from rich.console import Console

from moekd.data.batches import response_positions
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.data.tokenizer import tokenizer_differences
from moekd.distill.options import TrainOptions
from moekd.distill.sampled_losses import SAMPLED_BIASED
from moekd.encodings import decode_teacher, encoding_of, teacher_arrays
from moekd.encodings.sampled import estimable_temperature
from moekd.errors import MoekdError
from moekd.models import output_vocab_size
from moekd.store.reader import CacheReader
from moekd.store.verify import verify_store


class CacheSource:
    """Examples and their stored teacher distributions (and, with `gates`, the teacher's gate
    distributions); opens one CacheReader per process."""

    has_teacher = True

    def __init__(self, reader: CacheReader, temperature: float = 1.0, gates: bool = False):
        self.gate_info = reader.meta.gates
        self.gate_arrays = tuple(self.gate_info.arrays) if gates else ()
        self.location, self.storage_options = reader.location, reader.storage_options
        self.temperature = temperature
        self.lengths = reader.example_lengths()
        self.token_offsets, self.position_offsets = reader.token_offsets, reader.position_offsets
        self.prompt_len = reader.prompt_len.astype(np.int64)
        self.shards = reader.position_offsets[:-1] // reader.meta.layout.positions_per_shard
        self.num_samples = reader.meta.layout.num_samples  # M, the teacher samples per example
        self.encoding = reader.meta.encoding
        self.arrays = ("input_ids", *teacher_arrays(self.encoding), *self.gate_arrays)
        self._open(reader)

    def _open(self, reader: CacheReader) -> None:
        self._reader, self._pid = reader, os.getpid()
        self._arrays = {name: reader.group[name] for name in self.arrays}

    def __getstate__(self) -> dict:  # a spawned worker opens its own reader
        return {**self.__dict__, "_reader": None, "_arrays": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.lengths)

    def _handles(self) -> dict:
        """The zarr arrays, opened again in each worker process: handles do not survive a fork."""
        if self._pid != os.getpid():
            self._open(CacheReader(self.location, self.storage_options))
        return self._arrays

    @property
    def reader(self) -> CacheReader:
        self._handles()
        return self._reader

    def read(self, examples: list[int]) -> dict[str, np.ndarray]:
        """Tokens and stored positions of `examples`, one coordinate read per array."""
        handles = self._handles()
        tokens = np.concatenate([np.arange(self.token_offsets[e], self.token_offsets[e + 1]) for e in examples])
        rows = np.concatenate([np.arange(self.position_offsets[e], self.position_offsets[e + 1]) for e in examples])
        arrays = {name: handles[name].oindex[tokens if name == "input_ids" else rows] for name in self.arrays}
        return {
            **{name: arrays[name] for name in self.gate_arrays},
            "input_ids": arrays["input_ids"],
            "token_counts": self.lengths[examples],
            "position_counts": np.diff(self.position_offsets)[examples],
            # the store's alignment convention: positions prompt_len-1 .. L-2, each predicting the next token
            "target_positions": np.concatenate(
                [response_positions(self.prompt_len[e], self.lengths[e]) for e in examples]
            ),
            "teacher": self._teacher(decode_teacher(self.encoding, arrays)),  # [P, M, ...] arrays
        }

    def teacher_output_layer(self, device: torch.device) -> torch.Tensor | None:
        """A hidden cache's teacher output layer W [V, d] on `device` (its sha256 checked against the
        store's record), from which the loss computes the teacher's logits; None for other encodings."""
        return self.reader.output_layer().to(device) if encoding_of(self.encoding).id_array is None else None

    def _teacher(self, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the loss takes from the decoded arrays (for sampled caches: the ids and the unbiased
        estimate of the teacher at the training temperature)."""
        return encoding_of(self.encoding).training_targets(self.encoding, decoded, self.temperature)


class TokenizedSource:
    """Tokenized examples held in memory (`--data`): ground truth only, no teacher."""

    has_teacher = False
    num_samples = 0
    encoding = None
    gate_info = None

    def __init__(self, examples):
        self.examples = examples
        self.lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        self.shards = np.zeros(len(examples), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def teacher_output_layer(self, device: torch.device) -> None:
        return None

    def read(self, examples: list[int]) -> dict[str, np.ndarray]:
        chosen = [self.examples[e] for e in examples]
        targets = [e.target_positions for e in chosen]
        return {
            "input_ids": np.concatenate([e.input_ids for e in chosen]),
            "token_counts": self.lengths[examples],
            "position_counts": np.array([len(t) for t in targets]),
            "target_positions": np.concatenate(targets),
        }


def verify_cache(o: TrainOptions) -> None:
    """Refuse a --cache that fails `moekd cache verify` (structure and per-file checksums)."""
    report = verify_store(o.cache, storage_options=o.storage_options)
    if not report.ok:
        shown = "; ".join(report.problems[:3]) + (
            f" (+{len(report.problems) - 3} more)" if len(report.problems) > 3 else ""
        )
        raise MoekdError(
            f"--cache {o.cache} fails verification: {shown}. Run `moekd cache verify {o.cache}` for details"
        )


def open_source(o: TrainOptions, tokenizer, console: Console):
    """The example source and a hash identifying its content (a --cache is verified first with `verify_cache`)."""
    if o.data is not None:
        loaded = load_records(o.data, o.fields, o.skip_invalid)
        report = tokenize_records(
            loaded.records, loaded.source_index, tokenizer, o.max_prompt_len, o.max_len, o.chat_template, o.skip_invalid
        )
        return TokenizedSource(report.examples), loaded.fingerprint()
    reader = CacheReader(o.cache, o.storage_options)
    if len(reader) == 0:
        raise MoekdError(f"--cache {o.cache} holds no examples")
    if o.router_loss != "none" and reader.meta.gates is None:
        raise MoekdError(
            f"--router-loss {o.router_loss}: --cache {o.cache} stores no teacher gate distributions; rebuild it "
            "with `moekd cache build ... --router-probs full` (or top-R for many experts)"
        )
    _check_tokenizer(tokenizer, reader.meta.tokenizer, o, console)
    check_loss_fits_cache(o, reader.meta.encoding)
    return CacheSource(reader, o.temperature, gates=o.router_loss != "none"), reader.meta.build.manifest_sha256


def check_loss_fits_cache(o: TrainOptions, encoding) -> None:
    """Sampled caches estimate the teacher without bias for forward KL only, at temperature 1 or 1/t."""
    if encoding.kind != "sampled":
        return
    if o.loss in SAMPLED_BIASED:
        raise MoekdError(
            f"--loss {o.loss}: --cache {o.cache} holds sampled teacher tokens, and {SAMPLED_BIASED[o.loss]}; "
            "use --loss fkl, or a topk or hidden cache"
        )
    t = encoding.proposal_temp
    if o.loss != "ce" and estimable_temperature(o.temperature, t) is None:
        temperatures = "1" if t == 1.0 else f"1 or {1 / t:g}"
        raise MoekdError(
            f"--temperature {o.temperature:g}: --cache {o.cache} holds draws from p^{t:g}, which estimate the "
            f"teacher without bias at temperature {temperatures} only; use that, or rebuild the cache with "
            f"--proposal-temp {1 / o.temperature:g}"
        )


def _check_tokenizer(tokenizer, stored, o: TrainOptions, console: Console) -> None:
    same_ids, how = tokenizer_differences(tokenizer, stored.size, stored.sha256, stored.vocab_sha256)
    if not how:
        return
    what = f"the student's tokenizer ({o.student}) differs from the cache's ({stored.name_or_path}): {'; '.join(how)}"
    if same_ids and o.allow_tokenizer_mismatch:
        console.print(f"[yellow]warning:[/] {what}; training anyway (--allow-tokenizer-mismatch)", highlight=False)
        return
    hint = (
        "pass --allow-tokenizer-mismatch to train anyway: the ids mean the same tokens"
        if same_ids
        else "--allow-tokenizer-mismatch cannot help, the ids mean different tokens: use a student built with the cache's tokenizer"
    )
    raise MoekdError(f"--student: {what}; {hint}")


def check_vocabulary(model, source, student: str) -> None:
    vocab = output_vocab_size(model)
    if isinstance(source, TokenizedSource):
        largest = max(int(e.input_ids.max()) for e in source.examples)
        if largest >= vocab:
            raise MoekdError(
                f"--student {student}: its output layer has {vocab} entries but the data holds token id {largest}"
            )
        return
    reader = source.reader
    teacher_vocab = reader.meta.teacher.vocab_size
    if vocab >= teacher_vocab:
        return
    if encoding_of(reader.meta.encoding).id_array is None:  # hidden: the whole vocabulary
        raise MoekdError(
            f"--student {student}: its output layer has {vocab} entries, fewer than the teacher's {teacher_vocab}, "
            "over all of which a hidden-state cache gives the teacher's distribution; use a student whose "
            "output layer has at least as many entries"
        )
    largest = max(reader.largest_stored_id(), int(reader.group["input_ids"][:].max()))
    if largest >= vocab:
        raise MoekdError(
            f"--student {student}: its output layer has {vocab} entries, fewer than the teacher's {reader.meta.teacher.vocab_size}, "
            f"and the cache holds token id {largest}; use a student whose vocabulary covers the cache's tokenizer"
        )
