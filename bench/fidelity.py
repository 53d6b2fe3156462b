"""Cache fidelity per byte: what each encoding costs on disk and in distillation quality, in one run.

    python bench/fidelity.py --quick --json bench/results/fidelity.json  # the quick demo's teacher (~10 min here)
    python bench/fidelity.py --workdir moekd-demo --json bench/results/fidelity_default.json   # the demo's teacher

On the teacher `moekd demo` trains by SFT on the built-in suite (`moekd.demo.prepare_teacher`, the
demo's DEFAULT_PLAN; a demo work directory is reused, or the teacher trained anew) it builds a cache of the training split in every setting below,
then measures, for each one:
- bytes per position-sample of the teacher arrays (`moekd cache info`);
- gradient fidelity against the exact full-vocabulary forward KL (teacher logits from its own
  forward), at the initial student, on one batch of a few thousand cached positions: the cosine
  and relative norm error of the gradient with respect to the student's parameters (through the
  trainer's own objective), and the mean per-position cosine of the gradients with respect to the
  student's logits (which understates unbiased estimators: their noise averages out over a batch);
- the held-out loss after the same short distillation run from each cache (`moekd train`, forward
  KL, same initialisation, steps and seed): the exact full-vocabulary KL(teacher || student) on the
  test split, computed from the teacher's own forward; "exact" is the run from a hidden fp32 cache,
  whose teacher distributions are the teacher's own up to float32 rounding.
Settings: topk k in {8, 16, 32, 64} (u16 steps at 256 per nat, and at 16 per nat for k = 32, 64
and 128), sampled n in {16, 32, 64} (t = 1), hidden bf16, fp8 and fp32. A bfloat16 run of the teacher
checks the hidden encoding bit for bit (see `bf16_check`). Prints the table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from moekd import CacheReader
from moekd.cache_builder.build import BuildOptions, build_cache
from moekd.data.batches import pack
from moekd.data.prompts import tokenize_records
from moekd.data.records import load_records
from moekd.demo import DEFAULT_PLAN, QUICK_PLAN, prepare_teacher
from moekd.distill.loader import BatchDataset
from moekd.distill.losses import dense_kd_loss, exact_losses_, sparse_kd_loss
from moekd.distill.losses import teacher_logprobs as exact_logprobs
from moekd.distill.objective import batch_loss
from moekd.distill.sampled_losses import sampled_kd_loss
from moekd.distill.sources import CacheSource, TokenizedSource
from moekd.distill.student import Student
from moekd.distill.train import TrainOptions, train
from moekd.store.info import store_info
from moekd.store.writer import store_state
from moekd.tiny_models import make_tiny_model

SETTINGS = {
    **{f"topk k={k}": dict(encoding="topk", k=k) for k in (8, 16, 32, 64)},
    **{f"topk k={k} /16": dict(encoding="topk", k=k, logprob_scale=16.0) for k in (32, 64, 128)},
    **{f"sampled n={n}": dict(encoding="sampled", draws=n) for n in (16, 32, 64)},
    "hidden bf16": dict(encoding="hidden"),
    "hidden fp8": dict(encoding="hidden", hidden_dtype="fp8"),
    "hidden fp32 (exact)": dict(encoding="hidden", hidden_dtype="fp32"),
}
EXACT = "hidden fp32 (exact)"


def build(work: Path, teacher: Path, data: Path, name: str, plan, **extra) -> Path:
    out = work / "caches" / (name.replace(" ", "_").replace("/", "s").replace("(", "").replace(")", "") + ".zarr")
    state = store_state(out)
    if state != "complete":
        settings = {"batch_tokens": plan.batch_tokens, **SETTINGS.get(name, {}), **extra}
        build_cache(
            BuildOptions(
                teacher=str(teacher),
                data=str(data),
                out=str(out),
                device="cpu",
                resume=state == "unfinished",
                **settings,
            )
        )
    return out


def gradient_batch(reader: CacheReader, positions: int) -> list[int]:
    """The first examples of the store holding at least `positions` stored positions."""
    counts = np.diff(reader.position_offsets)
    return list(range(int(np.searchsorted(np.cumsum(counts), positions)) + 1))


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def teacher_logprobs(teacher, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], use_cache=False).logits
    return torch.log_softmax(logits.flatten(0, 1)[batch["rows"]].double(), dim=-1).float()


def cached_loss_of_logits(batch: dict, reader: CacheReader, logits: torch.Tensor) -> torch.Tensor:
    """The cached forward-KL loss as a function of the student's logits [P, V] (for per-position gradients)."""
    kind = reader.encoding.kind
    if kind == "topk_tail":
        return sparse_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"]).mean(1)
    if kind == "sampled":
        return sampled_kd_loss(logits, batch["sampled_ids"], batch["sampled_weights"]).mean(1)
    weight, hidden = reader.output_layer(), batch["hidden_states"]
    return torch.stack(
        [dense_kd_loss(logits, exact_logprobs(hidden[:, m], weight)) for m in range(hidden.shape[1])], 1
    ).mean(1)


def gradient_fidelity(student_dir: Path, teacher, cache: Path, positions: int) -> dict:
    """Cached-loss gradients against the exact forward-KL gradients on the same batch and student."""
    from transformers import AutoModelForCausalLM

    reader = CacheReader(cache)
    examples = gradient_batch(reader, positions)
    source = CacheSource(reader)
    batch = BatchDataset(source, pad_id=0)[(0, 0, examples)]
    exact_logp = teacher_logprobs(teacher, batch)
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    o = TrainOptions(student=str(student_dir), out="-", cache=str(cache), loss="fkl")
    cpu = torch.device("cpu")
    batch_loss(Student(model), batch, o.kd_loss(source.encoding.kind), cpu, source.teacher_output_layer(cpu))[
        "loss"
    ].backward()  # the trainer's objective
    cached = flat_grad(model)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits.flatten(0, 1)[batch["rows"]]
    dense_kd_loss(logits, exact_logp).mean().backward()
    exact = flat_grad(model)
    # per position: gradients with respect to the logits
    leaf = logits.detach().requires_grad_(True)
    (g_cached,) = torch.autograd.grad(cached_loss_of_logits(batch, reader, leaf).sum(), leaf)
    (g_exact,) = torch.autograd.grad(dense_kd_loss(leaf, exact_logp).sum(), leaf)
    cached, exact = cached.double(), exact.double()
    row = {
        "positions": len(batch["rows"]),
        "param_cosine": F.cosine_similarity(cached, exact, dim=0).item(),
        "param_rel_error": ((cached - exact).norm() / exact.norm()).item(),
        "logit_cosine_mean": F.cosine_similarity(g_cached.double(), g_exact.double(), dim=1).mean().item(),
    }
    if "tail_logprob" in batch:  # how much of the teacher's mass the top-k leaves to the tail bucket
        row["tail_mass_mean"] = batch["tail_logprob"].double().exp().mean().item()
    return row


def held_out_kl(model_dir: Path, teacher, examples, batch_tokens: int) -> float:
    """Exact full-vocabulary KL(teacher || student) per response position of `examples`."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    source = TokenizedSource(examples)
    dataset = BatchDataset(source, pad_id=0)
    order = np.argsort(-source.lengths, kind="stable")
    total, count = 0.0, 0
    for b, members in enumerate(pack(order, source.lengths, batch_tokens)):
        batch = dataset[(0, b, members)]
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], use_cache=False).logits.flatten(0, 1)[batch["rows"]]
            total += dense_kd_loss(logits, teacher_logprobs(teacher, batch)).double().sum().item()
        count += len(batch["rows"])
    return total / count


def bf16_check(work: Path, teacher_dir: Path, data: Path, plan, examples: int = 64) -> dict:
    """A bfloat16 teacher stored as hidden bf16: are the stored states the teacher's own, bit for bit, and is the
    forward KL the trainer computes from the cache the one computed from the teacher's own logits?"""
    from transformers import AutoModelForCausalLM

    subset = work / "bf16_check.jsonl"
    subset.write_text("\n".join(data.read_text().splitlines()[:examples]) + "\n")
    # batch_tokens 1: every example alone, so the forward below is the build's own
    cache = build(
        work,
        teacher_dir,
        subset,
        "hidden bf16 (bf16 teacher)",
        plan,
        encoding="hidden",
        dtype="bfloat16",
        batch_tokens=1,
    )
    reader = CacheReader(cache)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.bfloat16).eval()
    weight = reader.output_layer()
    same_states = same_loss = positions = 0
    max_diff = 0.0
    g = torch.Generator().manual_seed(0)
    for ex in reader:
        ids = torch.from_numpy(ex.input_ids[None]).long()
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[0, torch.from_numpy(ex.target_positions).long()] = True
        with torch.no_grad():
            own_hidden = model.model(ids).last_hidden_state[keep]
            own_logits = model(ids, logits_to_keep=keep).logits
        stored = torch.from_numpy(ex.hidden_states[:, 0]).to(torch.bfloat16)
        student = torch.randn(own_logits.shape, generator=g)
        own = dense_kd_loss(student, torch.log_softmax(own_logits.float(), -1))
        # the trainer's exact loss of a hidden cache (losses.exact_losses_), from the stored states
        cached = exact_losses_(student.clone(), torch.from_numpy(ex.hidden_states), weight, None, 1.0, 0.0, False)[0][
            :, 0
        ]
        same_states += int(torch.equal(stored, own_hidden))
        same_loss += int(torch.equal(own, cached))
        max_diff = max(max_diff, (own - cached).abs().max().item())
        positions += len(stored)
    return {
        "examples": len(reader),
        "positions": positions,
        "hidden_states_bit_identical": same_states / len(reader),
        "loss_bit_identical": same_loss / len(reader),
        "loss_max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("fidelity-run"),
        help="where the teacher, caches and runs go (a `moekd demo --workdir` of the same plan is reused)",
    )
    parser.add_argument("--quick", action="store_true", help="the quick demo plan")
    parser.add_argument("--steps", type=int, help="optimizer steps of each distillation run (default: one epoch)")
    parser.add_argument("--grad-positions", type=int, default=3000, help="cached positions in the gradient batch")
    parser.add_argument("--only", help="comma-separated setting names to run (default: all); the exact one always runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",") or n == EXACT]
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    work = args.workdir
    plan_file, plan_json = work / "fidelity_plan.json", json.dumps(asdict(plan), indent=2)
    if plan_file.exists() and plan_file.read_text() != plan_json:
        parser.error(f"--workdir {work} holds a run of another plan (see {plan_file}); choose another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(plan_json)
    console = Console(stderr=True)
    started = time.time()
    teacher_dir = Path(prepare_teacher(work, plan, console)["model"])
    train_data, test_data = work / "data" / "train.jsonl", work / "data" / "test.jsonl"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    loaded = load_records(test_data)
    test = tokenize_records(loaded.records, loaded.source_index, tokenizer, 256, 512).examples
    init = work / "init" / "dense-seed0"
    if not (init / "config.json").exists():
        config = plan.students["dense"]
        make_tiny_model(config["family"], tokenizer, init, seed=0, **{k: v for k, v in config.items() if k != "family"})
    rows = {}
    for name in names:
        console.print(f"[bold]{name}[/]")
        cache = build(work, teacher_dir, train_data, name, plan)
        row = {"bytes_per_position_sample": store_info(str(cache))["distribution_bytes_per_position_sample"]}
        row.update(gradient_fidelity(init, teacher, cache, args.grad_positions))
        run = work / "fidelity_runs" / cache.stem
        if not (run / "final" / "checkpoint.json").exists():
            train(
                TrainOptions(
                    student=str(init),
                    out=str(run),
                    cache=str(cache),
                    loss="fkl",
                    lr=plan.student_lr,
                    batch_tokens=plan.batch_tokens,
                    warmup=plan.warmup,
                    max_steps=args.steps,
                    epochs=None if args.steps else 1,
                    eval_fraction=0,
                    eval_every=0,
                    save_every=0,
                    workers=0,
                    seed=0,
                    device="cpu",
                    resume="auto" if run.exists() else None,
                ),
                console,
            )
        row["held_out_kl"] = held_out_kl(run / "final", teacher, test, plan.batch_tokens)
        rows[name] = row
        console.print(row)
    exact = rows[EXACT]["held_out_kl"]
    for row in rows.values():
        row["held_out_vs_exact"] = row["held_out_kl"] / exact - 1
    check = bf16_check(work, teacher_dir, train_data, plan)
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "plan": "quick" if args.quick else "default",
        "teacher": {"vocab": teacher.config.vocab_size, "hidden": teacher.config.hidden_size},
        "wall_seconds": time.time() - started,
        "rows": rows,
        "bf16_check": check,
    }
    print(
        f"\n{'setting':<22}{'B/pos-sample':>13}{'param cos':>11}{'param err':>11}{'logit cos':>11}"
        f"{'held-out KL':>13}{'vs exact':>10}"
    )
    for name, r in rows.items():
        print(
            f"{name:<22}{r['bytes_per_position_sample']:>13.1f}{r['param_cosine']:>11.4f}{r['param_rel_error']:>11.4f}"
            f"{r['logit_cosine_mean']:>11.4f}{r['held_out_kl']:>13.4f}{100 * r['held_out_vs_exact']:>+9.2f}%"
        )
    print(
        f"\nhidden bf16 of a bfloat16 teacher ({check['positions']} positions): stored states bit-identical to the "
        f"teacher's own on {100 * check['hidden_states_bit_identical']:.0f}% of examples, forward KL from the cache "
        f"bit-identical to the one from the teacher's logits on {100 * check['loss_bit_identical']:.0f}% "
        f"(max difference {check['loss_max_abs_diff']:.2e})"
    )
    topk = [n for n, r in rows.items() if n.startswith("topk") and r["bytes_per_position_sample"] <= 128]
    sampled = [n for n, r in rows.items() if n.startswith("sampled") and r["bytes_per_position_sample"] <= 64]
    print(
        "targets: top-k <= 128 B within 1% of exact held-out loss: "
        + (", ".join(n for n in topk if rows[n]["held_out_vs_exact"] <= 0.01) or "none")
        + "; sampled <= 64 B with parameter-gradient cosine >= 0.98: "
        + (", ".join(n for n in sampled if rows[n]["param_cosine"] >= 0.98) or "none")
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
