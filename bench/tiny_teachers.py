"""How much routing matters in each family's tiny teacher: the table of docs/tiny_models.md.

For every MoE family of the installed transformers, the tiny teacher the conformance suite builds
(`make_tiny_family_model(model_type, vocab_size=258, seed=1)`), measured on 2 x 16 seeded token
ids (`moekd.tiny_routing.routing_strength`): the top-k experts' mean share of the gate
distribution g, KL(topk || all) and the KL between two `ka` samples (λ = 0.5), per position.

    PYTHONPATH=. python bench/tiny_teachers.py [--family mixtral ...]
"""

import argparse

import torch

from moekd.families import first_line, moe_families
from moekd.tiny_models import make_tiny_family_model
from moekd.tiny_routing import routing_strength

VOCAB = 258  # the conformance suite's byte tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", help="model types to measure (default: every MoE family)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    print("| family | top-k gate mass | KL(topk ‖ all), nats | KL between ka samples, nats |")
    print("|---|---|---|---|")
    for family in moe_families():
        if args.family and family.model_type not in args.family:
            continue
        try:
            model = make_tiny_family_model(family.model_type, vocab_size=VOCAB, seed=1)
        except Exception as e:
            print(f"| {family.model_type} | not built: {first_line(e)[:80]} | | |")
            continue
        r = routing_strength(model, ids)
        refused = "- (policies refused: topk only)"
        cells = [
            "- (no per-token router logits)" if r.gate_mass is None else f"{r.gate_mass:.3f}",
            refused if r.kl_topk_all is None else f"{r.kl_topk_all:.3g}",
            refused if r.kl_ka_samples is None else f"{r.kl_ka_samples:.2g}",
        ]
        print(f"| {family.model_type} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
