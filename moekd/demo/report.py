"""The demo's results as tables and a plot."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def _fmt(stat: dict | None, digits: int) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def _fmt_diff(stat: dict | None, digits: int) -> str:
    diff = (stat or {}).get("vs_reference")
    if not diff:
        return "-"
    interval = f" [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]" if diff["low"] is not None else ""
    return f"{diff['mean']:+.{digits}f}{interval}"


def results_table(results: dict, title: str = "moekd demo") -> Table:
    """Teacher rows (std over sampling seeds) and student rows (mean ± std over training seeds, paired differences)."""
    plan = results["plan"]
    table = Table(
        title=f"{title}: the built-in test split ({plan['n_test']} prompts)",
        caption=f"ROUGE-L: students mean ± std (ddof=1) over {len(plan['train_seeds'])} training seeds of the mean over "
        f"{len(plan['seeds'])} sampling seeds; teachers mean ± std over sampling seeds. NLL, KL: nats per response token, "
        f"teacher-forced (KL from the native teacher). Δ: paired difference to {plan['reference']}{_own_references(plan)}, "
        "95% t-interval over training seeds.",
    )
    for column in ("model", "ROUGE-L", "Δ ROUGE-L", "NLL", "Δ NLL", "KL", "Δ KL", "cache"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in results["teacher"].items():
        label = "teacher" if name == "native" else f"teacher {name}"
        rouge = {"mean": row["rougeL"], "std": row["rougeL_sampling_std"]} if row["rougeL"] is not None else None
        kl = "-" if name == "native" else f"{row['kl']:.4f}"
        table.add_row(label, _fmt(rouge, 2), "", f"{row['nll']:.4f}", "", kl, "", "")
    sar_caches = {c["name"] for c in plan["caches"] if c["policy"] == "sar"}
    for name, row in results["rows"].items():
        cache = f"{row['cache_bytes'] / 1e6:.2f} MB, {row['build_seconds']:.0f} s" if "cache_bytes" in row else "-"
        if row.get("cache") in sar_caches and results.get("sar", {}).get("train_seconds"):
            cache += f" + {results['sar']['train_seconds']:.0f} s SAR"
        table.add_row(
            f"student {name}",
            _fmt(row.get("rougeL"), 2),
            _fmt_diff(row.get("rougeL"), 2),
            _fmt(row.get("nll"), 4),
            _fmt_diff(row.get("nll"), 4),
            _fmt(row.get("kl"), 4),
            _fmt_diff(row.get("kl"), 4),
            cache,
        )
    return table


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(2.4 * len(names) + 2, 4))
    for ax, metric, label in ((axes[0], "rougeL", "ROUGE-L (x100)"), (axes[1], "nll", "response NLL (nats/token)")):
        means = [rows[n][metric]["mean"] for n in names]
        stds = [rows[n][metric]["std"] or 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel(label)
        if metric == "rougeL":
            ax.axhline(results["teacher"]["native"]["rougeL"], color="#888888", linestyle="--", label="teacher")
            ax.legend(loc="lower right")
        else:
            ax.set_ylim(bottom=min(means) - 3 * max(stds + [0.01]))
    fig.suptitle("moekd: students, mean ± std over training seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _own_references(plan: dict) -> str:
    own = [f"{r['name']}: to {r['reference']}" for r in plan["rows"] if r.get("reference")]
    return f" ({'; '.join(own)})" if own else ""


def routing_table(results: dict) -> Table | None:
    """The MoE students' held-out KD loss, expert-load CV and gate entropy (None when the plan has no MoE student)."""
    rows = {name: row for name, row in results["rows"].items() if "load_cv" in row}
    if not rows:
        return None
    plan = results["plan"]
    table = Table(
        title="MoE students: held-out KD loss and routing",
        caption="held-out KD: forward KL on the cache's held-out examples at the end of training; load CV: coefficient "
        "of variation of the expert load, gate H: gate entropy (nats), on the test split, mean over MoE layers; mean ± "
        f"std over {len(plan['train_seeds'])} training seeds; Δ as above.",
    )
    for column in ("model", "held-out KD", "Δ held-out KD", "load CV", "Δ load CV", "gate H", "Δ gate H"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        cells = [
            cell
            for key in ("heldout_kd", "load_cv", "gate_entropy")
            for cell in (_fmt(row.get(key), 4), _fmt_diff(row.get(key), 4))
        ]
        table.add_row(f"student {name}", *cells)
    return table
