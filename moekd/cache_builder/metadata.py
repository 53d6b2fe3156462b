"""What a build writes about itself: the store metadata, and the settings a resume must match."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

import torch

from moekd import __version__
from moekd.data.tokenizer import tokenizer_fingerprint
from moekd.encodings.gates import gate_specs
from moekd.fsio import hash_arrays
from moekd.models import output_vocab_size
from moekd.schemas.cache import (
    BuildInfo,
    CacheMetadata,
    DatasetInfo,
    GateInfo,
    LayoutInfo,
    PolicyInfo,
    TeacherInfo,
    TokenizerInfo,
)
from moekd.schemas.router import RouterFileRef
from moekd.seeds import SEED_DERIVATION
from moekd.store.layout import POSITIONS_PER_CHUNK, array_specs
from moekd.store.writer import ExampleTables

GATE_DEFINITION = (
    "g = {g} (the router's per-expert scores normalised to sum 1, see moekd.routing.routers); "
    "taken at the stored position, under the sample's routing policy"
)


def describe_store(
    o,
    model,
    tokenizer,
    controller,
    policy,
    encoder,
    gate_r,
    loaded,
    report,
    tables,
    device,
    dtype,
    weights_sha256: str | None,
    router: RouterFileRef | None = None,
) -> CacheMetadata:
    """Metadata of the store a build with options `o` is about to write (status: building);
    `router` is the loaded router file of --policy sar."""
    samples, num_positions = policy.samples, len(tables.target_positions)
    arrays = array_specs(
        len(report.examples), len(tables.input_ids), num_positions, samples, encoder.info, output_vocab_size(model)
    )
    gates = None
    if gate_r:
        extra = gate_specs(num_positions, samples, len(controller.moe_layers), controller.num_experts, gate_r)
        arrays.update(extra)
        gates = GateInfo(
            mode="full" if gate_r == controller.num_experts else "top",
            r=gate_r,
            num_experts=controller.num_experts,
            layers=controller.moe_layers,
            definition=GATE_DEFINITION.format(g=controller.gate_definition),
            arrays=sorted(extra),
        )
    return CacheMetadata(
        teacher=TeacherInfo(
            name_or_path=str(o.teacher),
            architecture=type(model).__name__,
            model_type=model.config.model_type,
            revision=getattr(model.config, "_commit_hash", None),
            weights_sha256=weights_sha256,
            vocab_size=output_vocab_size(model),
            dtype=str(dtype).removeprefix("torch."),
            moe_layers=controller.moe_layers,
            router_class=controller.router_class,
            num_experts=controller.num_experts,
            experts_per_token=controller.top_k,
        ),
        tokenizer=TokenizerInfo(
            name_or_path=str(o.tokenizer or o.teacher),
            size=len(tokenizer),
            **tokenizer_fingerprint(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        policy=PolicyInfo(
            name=policy.name,
            samples=samples,
            stochastic=policy.stochastic,
            params=policy.describe(),
            seed=o.seed,
            seed_derivation=SEED_DERIVATION,
            router=router,
            weighting=controller.weighting,
        ),
        encoding=encoder.info,
        dataset=DatasetInfo(
            source=str(o.data),
            format=loaded.format,
            fingerprint_sha256=loaded.fingerprint(),
            fields=asdict(loaded.fields),
            template="chat" if o.chat_template else "dolly",
            max_prompt_len=o.max_prompt_len,
            max_len=o.max_len,
            rows_read=len(loaded.records) + sum(loaded.skipped.values()),
            examples=len(report.examples),
            skipped={**loaded.skipped, **report.skipped},
            truncated_responses=report.truncated_responses,
        ),
        layout=LayoutInfo(
            num_examples=len(report.examples),
            num_tokens=len(tables.input_ids),
            num_positions=num_positions,
            num_samples=samples,
            positions_per_chunk=min(POSITIONS_PER_CHUNK, o.positions_per_shard),
            positions_per_shard=o.positions_per_shard,
            arrays=arrays,
        ),
        build=BuildInfo(
            status="building",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            units=-(-num_positions // o.positions_per_shard),
            batch_tokens=o.batch_tokens,
            device=str(device),
            versions=_versions(),
        ),
        gates=gates,
    )


def resume_settings(
    o,
    policy,
    encoding_flags: dict,
    tokenizer,
    loaded,
    tables: ExampleTables,
    device,
    dtype,
    weights_sha256: str | None,
    router_sha256: str | None = None,
) -> dict:
    """Everything that determines the store's content: a resumed build must match it field by field.
    Computed before the teacher is loaded, so that a complete store is recognised without loading it."""
    import transformers

    return {
        # tokens, offsets, prompt lengths and source rows (which also seed the samples)
        "examples_sha256": hash_arrays(vars(tables)),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "teacher_weights_sha256": weights_sha256 or str(o.teacher),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer)["sha256"],
        "data_fingerprint": loaded.fingerprint(),
        "fields": asdict(loaded.fields),
        "template": "chat" if o.chat_template else "dolly",
        "max_prompt_len": o.max_prompt_len,
        "max_len": o.max_len,
        "skip_invalid": o.skip_invalid,
        "max_examples": o.max_examples,
        "policy": policy.name,
        "policy_params": policy.describe(),
        "samples": policy.samples,
        "seed": o.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_tokens": o.batch_tokens,
        "positions_per_shard": o.positions_per_shard,
        "router_probs": o.router_probs,
        "encoding": o.encoding,
        **encoding_flags,
        # --policy sar: another router file is another teacher
        **({"router_sha256": router_sha256} if router_sha256 else {}),
    }


def _versions() -> dict[str, str]:
    import transformers
    import zarr

    return {
        "moekd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
    }
