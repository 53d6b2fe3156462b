"""Teacher passes for one unit of the store: batches, M samples under the routing policy, encoded arrays."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from moekd.data.batches import longest_first, pack, response_positions, right_pad
from moekd.encodings.gates import encode_gates
from moekd.errors import MoekdError
from moekd.schemas.cache import ArraySpec
from moekd.seeds import derive_seed
from moekd.store.layout import Unit, examples_overlapping
from moekd.store.writer import ExampleTables


def length_batches(indices, lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Examples grouped longest first so that rows x longest row stays within `batch_tokens`."""
    return pack(longest_first(indices, lengths), lengths, batch_tokens)


def pad_batch(tables: ExampleTables, batch: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, target mask) [B, longest] of the examples in `batch`;
    the target mask marks the positions whose distributions the store keeps."""
    sequences = [tables.input_ids[tables.token_offsets[e] : tables.token_offsets[e + 1]] for e in batch]
    targets = [response_positions(int(tables.prompt_len[e]), len(s)) for e, s in zip(batch, sequences)]
    return right_pad(sequences, pad_id, targets)


class UnitRunner:
    """Teacher passes for the examples of one unit, M samples each, encoded for the store (moekd/encodings/)."""

    def __init__(
        self,
        model,
        controller,
        tables: ExampleTables,
        samples: int,
        encoder,
        specs: dict[str, ArraySpec],
        seed: int,
        pad_id: int,
        batch_tokens: int,
        gate_r: int | None = None,
    ):
        self.model, self.controller, self.encoder, self.gate_r = model, controller, encoder, gate_r
        self.tables, self.samples, self.seed = tables, samples, seed
        self.pad_id, self.batch_tokens = pad_id, batch_tokens
        # the teacher's arrays of the store, filled position by position
        self.specs = {
            name: spec
            for name, spec in specs.items()
            if spec.dims[:2] == ["position", "sample"] and not name.startswith("gate_")
        }
        self.lengths = np.diff(tables.token_offsets)
        self.device = next(model.parameters()).device
        self.slices_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def tokens(self, unit_examples: range) -> int:
        return int(self.lengths[list(unit_examples)].sum()) * self.samples

    @torch.no_grad()
    def run(self, unit: Unit, on_batch=lambda tokens: None) -> dict[str, np.ndarray]:
        t = self.tables
        examples = examples_overlapping(t.position_offsets, unit)
        first = int(t.position_offsets[examples.start])
        span = int(t.position_offsets[examples.stop]) - first
        arrays = {name: np.zeros((span, *spec.shape[1:]), spec.dtype) for name, spec in self.specs.items()}
        if self.gate_r:
            gates = np.zeros(
                (span, self.samples, len(self.controller.moe_layers), self.controller.num_experts), np.float32
            )
        with self.encoder.capturing():
            for batch in length_batches(examples, self.lengths, self.batch_tokens):
                input_ids, attention, targets = (x.to(self.device) for x in pad_batch(t, batch, self.pad_id))
                rows = np.concatenate(
                    [np.arange(t.position_offsets[e], t.position_offsets[e + 1]) - first for e in batch]
                )
                where = targets.nonzero()  # (batch row, position) of each stored position, in row-major order
                # The lm_head runs on the target positions only (a boolean `logits_to_keep` returns their
                # logits flattened, in row-major order); prompt logits would be thrown away.
                keep = {"logits_to_keep": targets} if self.slices_logits else {}
                for m in range(self.samples):
                    seeds = [derive_seed(self.seed, int(t.source_index[e]), m) for e in batch]
                    with self.controller.active(row_seeds=seeds):
                        logits = self.model(
                            input_ids=input_ids, attention_mask=attention, use_cache=False, **keep
                        ).logits
                    logits = logits if logits.dim() == 2 else logits[targets]
                    if not torch.isfinite(logits.float().amax(dim=-1)).all():
                        rows_bad = sorted({int(t.source_index[e]) for e in batch})
                        raise MoekdError(
                            f"the teacher produced non-finite logits in a batch of data rows {rows_bad[:10]} "
                            f"(sample {m}); try --dtype float32 or bfloat16 instead of float16"
                        )
                    row_seeds = torch.tensor(seeds, dtype=torch.int64)[where[:, 0].cpu()]
                    encoded = self.encoder.encode(logits, row_seeds, where[:, 1].cpu(), targets)
                    for name, value in encoded.items():
                        arrays[name][rows, m] = value
                    if self.gate_r:  # routers see every token: [B*T, N] per layer -> [P_b, L, N]
                        per_layer = torch.stack(self.controller.gate_probs(), dim=1)
                        gates[rows, m] = per_layer.view(*targets.shape, *per_layer.shape[1:])[targets].cpu().numpy()
                    on_batch(int(attention.sum()))
        lo, hi = unit.start - first, unit.stop - first
        arrays = {name: value[lo:hi] for name, value in arrays.items()}
        arrays["target_positions"] = t.target_positions[unit.start : unit.stop]
        if self.gate_r:
            arrays.update(encode_gates(gates[lo:hi], self.gate_r))
        return arrays
