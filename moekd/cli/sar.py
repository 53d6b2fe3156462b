"""`moekd sar ...`: Student-Aware Router training."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moekd.cli.app import console, sar_app


@sar_app.command("train")
def sar_train(
    teacher: str = typer.Option(
        ...,
        help="MoE teacher checkpoint directory: any family whose routers moekd recognises (see `moekd routing families`).",
    ),
    student: str = typer.Option(
        ..., help="Student checkpoint directory; its tokenizer must map tokens to ids as the teacher's does."
    ),
    data: Path = typer.Option(
        ...,
        help="Training data (.jsonl, .json, .parquet or a datasets directory): the prompts, and the responses with --responses data.",
    ),
    out: Path = typer.Option(
        ...,
        help="Router file to write, e.g. router.safetensors; the run (metrics, checkpoints) goes to router.run/ beside it.",
    ),
    steps: int = typer.Option(200, help="Router updates."),
    lr: float = typer.Option(5e-6, help="AdamW learning rate of the routers (published 1e-6 .. 5e-6)."),
    beta: float = typer.Option(
        0.01, help="Weight β of the load-balancing term CV(importance)² + CV(load)², per MoE layer."
    ),
    teacher_kld: str = typer.Option("reverse", help="reverse: KL(p_T || q_s) (published); forward: -Σ q_s log p_T."),
    responses: str = typer.Option(
        "data",
        help="data: the dataset's responses; student: the student samples a response each step (published, on-policy).",
    ),
    co_train_student: bool = typer.Option(
        False,
        "--co-train-student",
        help="Alternate one router step and one student step (reverse KL against the updated teacher); saves the student to router.student/.",
    ),
    student_lr: float | None = typer.Option(None, help="AdamW learning rate of the co-trained student (default 1e-5)."),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per batch (rows x longest row of the data)."),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        help="Recompute the teacher's layer activations in backward instead of keeping them.",
    ),
    dtype: str = typer.Option(
        "auto",
        help="Teacher compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16; routers stay float32.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Seed of the batch order and the sampled responses."),
    resume: str | None = typer.Option(
        None, help="auto (newest complete checkpoint in router.run/, or a fresh start) or a step-XXXXXX directory."
    ),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (routers; the student too)."),
    max_new_tokens: int = typer.Option(256, help="--responses student: longest sampled response."),
    save_every: int = typer.Option(50, help="Resumable checkpoint every N steps; 0: none."),
    max_prompt_len: int = typer.Option(256, help="Longest prompt in tokens."),
    max_len: int = typer.Option(512, help="Longest prompt+response in tokens (responses are truncated)."),
    chat_template: bool = typer.Option(
        False, "--chat-template", help="Build prompts with the tokenizer's chat template instead of the Dolly template."
    ),
    instruction_field: str | None = typer.Option(None, help="Field holding the instruction."),
    context_field: str | None = typer.Option(None, help="Field holding the context ('' for none)."),
    response_field: str | None = typer.Option(None, help="Field holding the response."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Leave out bad or over-long rows instead of stopping."
    ),
) -> None:
    """Train the teacher's routers (all experts active, everything else frozen) so the student learns from it more easily.

    Example: moekd sar train --teacher ./teacher --student ./student --data train.jsonl --out router.safetensors --steps 200

    Then: moekd cache build --teacher ./teacher --data train.jsonl --out sar.zarr --policy sar --router router.safetensors
    """
    from moekd.sar.train import SarOptions, train_router

    options = SarOptions(
        teacher=teacher,
        student=student,
        data=str(data),
        out=str(out),
        steps=steps,
        lr=lr,
        beta=beta,
        teacher_kld=teacher_kld,
        responses=responses,
        co_train_student=co_train_student,
        student_lr=student_lr,
        batch_tokens=batch_tokens,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        device=device,
        seed=seed,
        resume=resume,
        max_grad_norm=max_grad_norm,
        max_new_tokens=max_new_tokens,
        save_every=save_every,
        max_prompt_len=max_prompt_len,
        max_len=max_len,
        chat_template=chat_template,
        skip_invalid=skip_invalid,
        fields={"instruction": instruction_field, "context": context_field, "response": response_field},
    )
    s = train_router(options, console=Console(stderr=True))
    student_note = f"; co-trained student in {s.student_out}" if s.student_out else ""
    console.print(
        f"[green]trained[/] the routers for {s.steps} steps, {s.tokens:,} teacher tokens at {s.tokens_per_second:,.0f} tok/s; "
        f"teacher loss on the probe batch {s.loss_start:.4f} -> {s.loss_end:.4f}; router file {s.out}{student_note}"
        + (f" (resumed from {s.resumed_from})" if s.resumed_from else ""),
        highlight=False,
    )
