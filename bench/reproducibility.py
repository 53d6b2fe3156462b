"""Is training bit-reproducible across runs on one machine, and what breaks it?

    python bench/reproducibility.py                 # ~2-4 minutes on a 2-core CPU
    python bench/reproducibility.py --json bench/results/reproducibility.json

Trains the same tiny student by SFT (the `moekd train` loop, shuffled batches) in separate
processes under several settings, then samples 32 responses from each result (`moekd eval`'s
generation), and compares every run with the first: are the final weights bit-identical
(sha256 of model.safetensors), how far apart are they, and are the sampled responses the same.
Settings: the same run twice; torch with 1 intra-op thread instead of the default; background
loader processes (`--workers 2`); torch's vectorised kernels capped at AVX2 and at none
(`ATEN_CPU_CAPABILITY`), which stands in for a machine whose CPU lacks AVX-512.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = {  # name -> (environment, extra train options)
    "baseline": ({}, {}),
    "baseline, run 2": ({}, {}),
    "1 thread": ({"MOEKD_THREADS": "1"}, {}),
    "loader workers 2": ({}, {"workers": 2}),
    "kernels capped at AVX2": ({"ATEN_CPU_CAPABILITY": "avx2"}, {}),
    "no vector kernels": ({"ATEN_CPU_CAPABILITY": "default"}, {}),
}


def setup(work: Path) -> None:
    """Data, tokenizer and one student initialisation, shared by every run."""
    from moekd.data.prompts import format_prompt
    from moekd.data.records import load_records
    from moekd.data.synth import write_suite
    from moekd.data.tokenizer import train_tokenizer
    from moekd.tiny_models import make_tiny_model

    write_suite(work / "data", seed=0, n_train=200, n_valid=16, n_test=32)
    texts = [format_prompt(r) + r.response for r in load_records(work / "data" / "train.jsonl").records]
    tokenizer = train_tokenizer(texts, 512, work / "tokenizer")
    make_tiny_model("llama", tokenizer, work / "init", seed=0, hidden=64, layers=2)


def child(work: Path, out: Path, options: dict) -> dict:
    """One training run and its sampled responses (runs in its own process)."""
    import torch

    if "MOEKD_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["MOEKD_THREADS"]))
    from moekd.data.prompts import format_prompt, prompt_ids
    from moekd.distill.train import TrainOptions, train
    from moekd.eval.evaluate import load_eval_examples
    from moekd.eval.generate import generate_responses, load_model

    train(
        TrainOptions(
            student=str(work / "init"),
            out=str(out),
            data=str(work / "data" / "train.jsonl"),
            loss="ce",
            epochs=2,
            lr=3e-3,
            batch_tokens=2048,
            warmup=5,
            save_every=0,
            eval_every=0,
            seed=0,
            device="cpu",
            **{"workers": 0, **options},
        )
    )
    model, tokenizer = load_model(out / "final", "cpu")
    prompts = [
        prompt_ids(tokenizer, format_prompt(ex.record), False)
        for ex in load_eval_examples(work / "data" / "test.jsonl")
    ]
    responses = generate_responses(model, tokenizer, prompts, seed=10, max_new_tokens=32, batch_size=16)
    weights = (out / "final" / "model.safetensors").read_bytes()
    return {
        "sha256": hashlib.sha256(weights).hexdigest(),
        "responses": responses,
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="Also write the comparison here.")
    parser.add_argument("--child", nargs=3, metavar=("WORK", "OUT", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, out, options = args.child
        print(json.dumps(child(Path(work), Path(out), json.loads(options))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(work)
        runs = {}
        for i, (name, (env, options)) in enumerate(VARIANTS.items()):
            out = work / f"run{i}"
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(work), str(out), json.dumps(options)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "dir": out}
        base = runs["baseline"]
        rows = []
        print(
            f"{'setting':<24} {'threads':>7} {'kernels':>8} {'weights identical':>18} {'max |dw|':>10} {'same responses':>15}"
        )
        for name, run in runs.items():
            diff = max_weight_difference(
                base["dir"] / "final" / "model.safetensors", run["dir"] / "final" / "model.safetensors"
            )
            same = sum(a == b for a, b in zip(run["responses"], base["responses"]))
            row = {
                "setting": name,
                "threads": run["threads"],
                "capability": run["capability"],
                "weights_identical": run["sha256"] == base["sha256"],
                "max_abs_weight_difference": diff,
                "same_responses": same,
                "responses": len(base["responses"]),
            }
            rows.append(row)
            print(
                f"{name:<24} {run['threads']:>7} {run['capability']:>8} {str(row['weights_identical']):>18} "
                f"{diff:>10.2e} {same:>8}/{len(base['responses'])}"
            )
    if args.json:
        import platform

        import torch

        args.json.write_text(
            json.dumps(
                {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor()}",
                    "torch": torch.__version__,
                    "runs": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
