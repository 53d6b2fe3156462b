"""Cache-build cost and store size, measured side by side in one run.

    python bench/cache_build.py            # ~2-4 minutes on a 2-core CPU
    python bench/cache_build.py --quick    # a smaller workload, for a smoke run

Prints, on the same batches of the same tiny Mixtral-style teacher (vocabulary 32k):
- cache-build time / bare teacher forward time (target <= 1.15): the build loop (forward,
  log-softmax, top-k, tail, encoding, Zarr writes) against model(...).logits alone, and the
  whole command (data loading, model loading, finalize) against the same forward time; the
  build computes logits only at the stored positions, so its loop is also compared with a bare
  forward that does the same (the honest measure of what sparsifying and writing cost);
- hook overhead: forward under the `topk` router controller / unhooked forward (target <= 1.05);
- `ka` build time with M samples / with M = 1 (target <= M x 1.05);
- store bytes per position-sample against raw fp32 full-vocabulary logits and raw fp16+int32 top-k;
- fidelity: stored log-probs, tail and top-k ids against the teacher's own float64 log-softmax.
Each timing is the minimum over interleaved repeats, because this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import AutoModelForCausalLM

from moekd.cache_builder.build import BuildOptions, build_cache, example_tables
from moekd.cache_builder.runner import length_batches, pad_batch
from moekd.data.prompts import format_prompt, tokenize_records
from moekd.data.records import load_records
from moekd.data.tokenizer import train_tokenizer
from moekd.routing.controller import RouterController
from moekd.routing.policies import make_policy
from moekd.store.info import store_info
from moekd.tiny_models import tiny_config

DEMO = Path(__file__).resolve().parents[1] / "moekd" / "data" / "demo_instructions.jsonl"


def bare_forward_seconds(model, tables, batch_tokens: int, pad_id: int, controller=None, targets_only=False) -> float:
    """Teacher forward over the build's batches, logits only (at every position, or at the target positions)."""
    import numpy as np

    lengths = np.diff(tables.token_offsets)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in length_batches(range(len(lengths)), lengths, batch_tokens):
            ids, mask, keep = pad_batch(tables, batch, pad_id)
            sliced = {"logits_to_keep": keep} if targets_only else {}
            if controller is None:
                model(input_ids=ids, attention_mask=mask, use_cache=False, **sliced)
            else:
                with controller.active():
                    model(input_ids=ids, attention_mask=mask, use_cache=False, **sliced)
    return time.perf_counter() - start


def fidelity(model, store: Path, examples: int = 64) -> dict:
    """Stored distributions against the teacher's own float64 log-softmax, example by example."""
    from moekd import CacheReader

    reader = CacheReader(store)
    lp_err, tail_err, same_set, positions = [], [], 0, 0
    with torch.no_grad():
        for i in range(min(examples, len(reader))):
            ex = reader[i]
            logits = model(torch.from_numpy(ex.input_ids[None]).long()).logits[0].double()
            exact = torch.log_softmax(logits, -1)[torch.from_numpy(ex.target_positions).long()]
            ids = torch.from_numpy(ex.topk_ids[:, 0]).long()
            lp_err.append((torch.from_numpy(ex.topk_logprobs[:, 0]).double() - exact.gather(1, ids)).abs().flatten())
            tail = torch.log1p(-exact.gather(1, ids).exp().sum(1))
            tail_err.append((torch.from_numpy(ex.tail_logprob[:, 0]).double() - tail).abs())
            true_ids = exact.topk(ids.shape[1], dim=-1).indices
            same_set += int((ids.sort(1).values == true_ids.sort(1).values).all(1).sum())
            positions += len(ids)
    lp_err, tail_err = torch.cat(lp_err), torch.cat(tail_err)
    return {
        "positions": positions,
        "logprob_max_abs_error": lp_err.max().item(),
        "logprob_mean_abs_error": lp_err.mean().item(),
        "tail_max_abs_error": tail_err.max().item(),
        "topk_id_set_exact_fraction": same_set / positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    copies, repeats = (2, 2) if args.quick else (8, args.repeats)
    k, batch_tokens, samples = 64, 4096, 2

    work = Path(tempfile.mkdtemp(prefix="moekd-bench-"))
    records = load_records(DEMO).records
    tokenizer = train_tokenizer([format_prompt(r) + r.response for r in records] * 4, 400, work / "tok")
    data = work / "data.jsonl"
    data.write_text(DEMO.read_text() * copies)
    # A 32k output vocabulary, as real teachers have, over the small demo tokenizer.
    torch.manual_seed(0)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    teacher = AutoModelForCausalLM.from_config(
        tiny_config("mixtral", 32000, hidden=128, layers=2, special_ids=ids)
    ).eval()
    teacher.save_pretrained(str(work / "teacher"))
    tokenizer.save_pretrained(str(work / "teacher"))

    loaded = load_records(data)
    tables = example_tables(tokenize_records(loaded.records, loaded.source_index, tokenizer, 256, 512).examples)
    controller = RouterController(teacher, make_policy("topk"))

    def build(policy: str, m: int | None = None):
        out = work / f"{policy}-{m}.zarr"
        params = {"samples": m} if m else {}
        summary = build_cache(
            BuildOptions(
                teacher=str(work / "teacher"),
                data=str(data),
                out=str(out),
                policy=policy,
                policy_params=params,
                k=k,
                batch_tokens=batch_tokens,
                device="cpu",
                overwrite=True,
            )
        )
        return summary, out

    forward, sliced, hooked, loop, wall, ka1, kam = [], [], [], [], [], [], []
    for _ in range(repeats):
        forward.append(bare_forward_seconds(teacher, tables, batch_tokens, tokenizer.pad_token_id))
        sliced.append(bare_forward_seconds(teacher, tables, batch_tokens, tokenizer.pad_token_id, targets_only=True))
        hooked.append(bare_forward_seconds(teacher, tables, batch_tokens, tokenizer.pad_token_id, controller))
        summary, topk_store = build("topk")
        loop.append(summary.teacher_seconds)
        wall.append(summary.wall_seconds)
        ka1.append(build("ka", 1)[0].teacher_seconds)
        kam.append(build("ka", samples)[0].teacher_seconds)

    info = store_info(str(topk_store))
    measured = fidelity(teacher, topk_store)
    meta = info["meta"]
    per_sample = info["distribution_bytes_per_position_sample"]
    vocab = meta.teacher.vocab_size
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} threads={torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "workload": {
            "examples": meta.layout.num_examples,
            "tokens": meta.layout.num_tokens,
            "positions": meta.layout.num_positions,
            "vocab": vocab,
            "k": k,
            "batch_tokens": batch_tokens,
        },
        "seconds": {
            "bare_forward": min(forward),
            "bare_forward_target_logits": min(sliced),
            "topk_hooked_forward": min(hooked),
            "build_loop": min(loop),
            "build_command": min(wall),
            "ka_m1_loop": min(ka1),
            f"ka_m{samples}_loop": min(kam),
        },
        "ratios": {
            "build_loop_over_forward": min(loop) / min(forward),
            "build_loop_over_target_logits_forward": min(loop) / min(sliced),
            "build_command_over_forward": min(wall) / min(forward),
            "topk_hooks_over_unhooked": min(hooked) / min(forward),
            f"ka_m{samples}_over_m1": min(kam) / min(ka1),
        },
        "fidelity_vs_float64_teacher": measured,
        "bytes_per_position_sample": {
            "moekd_store": per_sample,
            "raw_fp32_full_vocab": 4 * vocab,
            "raw_fp16_int32_topk": 6 * k,
        },
    }
    results["ratios"]["store_vs_fp32_full_vocab"] = per_sample / (4 * vocab)
    results["ratios"]["store_vs_fp16_int32_topk"] = per_sample / (6 * k)
    print(json.dumps(results, indent=2))
    print(
        f"\nbuild loop / bare forward        {results['ratios']['build_loop_over_forward']:.3f}   (target <= 1.15)\n"
        f"build loop / forward, logits at the stored positions only  "
        f"{results['ratios']['build_loop_over_target_logits_forward']:.3f}   (the overhead of sparsify + encode + write)\n"
        f"whole build / bare forward       {results['ratios']['build_command_over_forward']:.3f}   (includes loading and finalize)\n"
        f"topk hooks / unhooked forward    {results['ratios']['topk_hooks_over_unhooked']:.3f}   (target <= 1.05)\n"
        f"ka M={samples} / M=1 build loop        {results['ratios'][f'ka_m{samples}_over_m1']:.3f}   (target <= {samples * 1.05:.2f})\n"
        f"store bytes per position-sample  {per_sample:.1f} = {results['ratios']['store_vs_fp32_full_vocab']:.5f} x fp32 logits, "
        f"{results['ratios']['store_vs_fp16_int32_topk']:.3f} x fp16+int32 top-{k}\n"
        f"fidelity on {measured['positions']} positions: log-prob error max {measured['logprob_max_abs_error']:.5f} "
        f"mean {measured['logprob_mean_abs_error']:.5f} nat (bound 1/512 = 0.00195 plus float32), tail error max "
        f"{measured['tail_max_abs_error']:.2e}, top-k id set exact on {measured['topk_id_set_exact_fraction']:.4f} of positions"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
