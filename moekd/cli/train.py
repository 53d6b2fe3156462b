"""`moekd train`: distil a student from a cache, or SFT on data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import app, console


@app.command("train")
def train_command(
    student: str = typer.Option(
        ..., help="Student checkpoint: a local Hugging Face causal LM directory (dense or MoE)."
    ),
    out: Path = typer.Option(
        ..., help="Run directory: config.json, metrics.jsonl/.csv, step-XXXXXX/ checkpoints, final/."
    ),
    cache: str | None = typer.Option(
        None,
        help="Teacher cache to distil from: a directory, a packed .zip, or an fsspec URL (s3://, gs://, http(s)://).",
    ),
    storage_options: str | None = typer.Option(
        None, help="""fsspec options for a --cache URL as JSON, e.g. '{"anon": true}' (not written to --out)."""
    ),
    data: Path | None = typer.Option(None, help="Instruction data for plain SFT with --loss ce, instead of --cache."),
    loss: str = typer.Option("fkl", help="fkl, rkl, skl, srkl, jsd, tvd (over the k stored ids + tail bucket), or ce."),
    skew_lambda: float = typer.Option(0.1, help="Mixing weight λ of skl and srkl."),
    jsd_beta: float = typer.Option(0.5, help="β of jsd."),
    temperature: float = typer.Option(
        1.0, help="Divides student logits and teacher log-probs (loss not scaled by T²)."
    ),
    ce_weight: float = typer.Option(0.0, help="w in (1-w)·KD + w·CE, CE on the ground-truth response tokens."),
    samples: str = typer.Option(
        "mean", help="With M > 1 teacher samples: mean (average the losses) or random (one per example and epoch)."
    ),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    schedule: str = typer.Option("cosine", help="constant or cosine (to 0), after the warmup."),
    warmup: int = typer.Option(0, help="Optimizer steps of linear warmup."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    batch_tokens: int = typer.Option(8192, help="Padded tokens per micro-batch (rows x longest row)."),
    loss_chunk: int = typer.Option(
        1024,
        help="Positions per chunk of the loss: logits are computed chunk by chunk from the hidden states, never all at once.",
    ),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps to train (instead of --epochs)."),
    epochs: int | None = typer.Option(
        None, help="Passes over the training examples (default 1 when --max-steps is not given)."
    ),
    eval_every: int = typer.Option(
        100, help="Held-out evaluation every N steps (also before the first and after the last); 0: only those."
    ),
    eval_fraction: float = typer.Option(
        0.05, help="Share of the examples held out for evaluation (at least 1; 0 for none); fixed for a given dataset."
    ),
    save_every: int = typer.Option(500, help="Resumable checkpoint every N steps; 0: only final/."),
    resume: str | None = typer.Option(
        None, help="auto (newest complete checkpoint in --out, or a fresh start) or a step-XXXXXX directory."
    ),
    seed: int = typer.Option(0, help="Seed of the batch order, the --samples random draws and torch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    workers: int = typer.Option(
        2, help="Loader processes reading the cache ahead of training (0: read in the training process)."
    ),
    allow_tokenizer_mismatch: bool = typer.Option(
        False,
        "--allow-tokenizer-mismatch",
        help="Train although the tokenizers differ, when their token-to-id mappings are the same.",
    ),
    max_prompt_len: int = typer.Option(256, help="--data: longest prompt in tokens."),
    max_len: int = typer.Option(512, help="--data: longest prompt+response in tokens (responses are truncated)."),
    chat_template: bool = typer.Option(
        False, "--chat-template", help="--data: build prompts with the tokenizer's chat template, as cache build does."
    ),
    instruction_field: str | None = typer.Option(None, help="--data: field holding the instruction."),
    context_field: str | None = typer.Option(None, help="--data: field holding the context ('' for none)."),
    response_field: str | None = typer.Option(None, help="--data: field holding the response."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="--data: leave out bad or over-long rows instead of stopping."
    ),
    router_loss: str = typer.Option(
        "none",
        help="MoE students: none, or bdistill (Balanced Distillation from the cache's teacher gate distributions; needs --router-probs).",
    ),
    expert_weight: float = typer.Option(
        0.1, help="bdistill: weight of the router terms, added as w·(L_mc + coverage + L_router)."
    ),
    mc_draws: int = typer.Option(3, help="bdistill: Monte-Carlo expert draws K per position, sample and layer."),
    mc_alpha: float = typer.Option(
        0.5, help="bdistill: a drawn expert's probability is multiplied by α (in (0, 1]) before the next draw."
    ),
    coverage_weight: float = typer.Option(
        0.5, help="bdistill: weight of the coverage term KL(mean teacher gates || mean student gates)."
    ),
    router_beta: float = typer.Option(0.1, help="bdistill: β in L_router = KL(p_T || gate(g/τ)) - β·H(gate(g/τ))."),
    router_tau_init: float = typer.Option(
        1.0, help="bdistill: initial τ of every mapped layer (learned, clamped to [0.5, 1.5])."
    ),
    router_layers: str = typer.Option(
        "all", help="bdistill: all mapped MoE layers, or last (the student's last mapped layer, as the published code)."
    ),
    layer_map: str = typer.Option(
        "auto",
        help='bdistill: auto (student MoE layer s takes teacher layer round(s·(L_T-1)/(L_S-1))) or student:teacher pairs "0:0,1:2".',
    ),
    expert_map: str = typer.Option(
        "group",
        help="bdistill, student with fewer experts: group (sum contiguous teacher expert groups) or stride (every N_T/N_S-th, renormalised).",
    ),
    router_aux_coef: float = typer.Option(
        0.0, help="MoE students: weight of the student family's own load-balancing loss (0: off)."
    ),
) -> None:
    """Train a student on a teacher cache (KD), or on instruction data (--loss ce).

    Example: moekd train --cache run.zarr --student ./student --out runs/kd --loss fkl --max-steps 1000 --lr 5e-5 --warmup 50

    MoE student, Balanced Distillation: moekd train --cache gates.zarr --student ./moe --out runs/bd --router-loss bdistill --expert-weight 0.1

    On several GPUs (DDP, each rank trains its share of every batch): torchrun --standalone --nproc-per-node 8 -m moekd -- train ...
    """
    from moekd.distill.train import TrainOptions, train
    from moekd.distributed import Ranks
    from moekd.store.location import parse_storage_options

    options = TrainOptions(
        student=student,
        out=str(out),
        cache=cache,
        storage_options=parse_storage_options(storage_options),
        data=str(data) if data else None,
        loss=loss,
        skew_lambda=skew_lambda,
        jsd_beta=jsd_beta,
        temperature=temperature,
        ce_weight=ce_weight,
        samples=samples,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup=warmup,
        max_grad_norm=max_grad_norm,
        batch_tokens=batch_tokens,
        loss_chunk=loss_chunk,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        eval_every=eval_every,
        eval_fraction=eval_fraction,
        save_every=save_every,
        resume=resume,
        seed=seed,
        device=device,
        workers=workers,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        max_prompt_len=max_prompt_len,
        max_len=max_len,
        chat_template=chat_template,
        skip_invalid=skip_invalid,
        fields={"instruction": instruction_field, "context": context_field, "response": response_field},
        router_loss=router_loss,
        expert_weight=expert_weight,
        mc_draws=mc_draws,
        mc_alpha=mc_alpha,
        coverage_weight=coverage_weight,
        router_beta=router_beta,
        router_tau_init=router_tau_init,
        router_layers=router_layers,
        layer_map=layer_map,
        expert_map=expert_map,
        router_aux_coef=router_aux_coef,
    )
    s = train(options, console=Console(stderr=True))
    if not Ranks.from_env().main:
        return  # rank 0 prints the run's summary
    evals = (
        f"held-out loss {s.eval_loss_start:.4f} -> {s.eval_loss:.4f}; "
        if s.eval_loss_start is not None
        else (f"held-out loss {s.eval_loss:.4f}; " if s.eval_loss is not None else "")
    )
    console.print(
        f"[green]trained[/] {s.steps} steps, {s.tokens:,} tokens at {s.tokens_per_second:,.0f} tok/s; {evals}"
        f"model in {s.final_dir}" + (f" (resumed from {s.resumed_from})" if s.resumed_from else ""),
        highlight=False,
    )
