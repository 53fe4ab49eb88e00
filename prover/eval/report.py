"""Reports of a run: the Table-2 Markdown and the pass-rate plots, both from `summarize`'s output."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from prover.eval.records import ENSEMBLE


def describe_budget(strategy: str, budget: Mapping[str, Any], ensemble: str = "independent") -> str:
    """One sentence stating the per-theorem budget (per member), as Table 2's caption does."""
    if "sampl" in strategy.lower():
        search = f"pass@{budget['max_passes']} sampling"
    else:
        search = f"best-first, {budget['max_expansions']} expansions × {budget['tactics_per_expansion']} tactics"
    per = "per member" if ensemble != "mixture" else "shared by the members (mixture)"
    return (
        f"Budget {per}: {search}, {budget['time_limit_s']:g} s wall clock per theorem, "
        f"at most {budget['max_depth']} proof steps, {budget['tactic_timeout_s']:g} s per tactic."
    )


def _pct(row: Mapping[str, Any]) -> str:
    return f"{100.0 * row['pass_rate']:.1f}% ({row['proved']}/{row['theorems']})"


def table_markdown(summary: Mapping[str, Any], *, budget: Mapping[str, Any], ensemble: str, title: str = "Evaluation") -> str:
    """Table 2's shape: rows are the members then the ensemble, columns the benchmarks.

    Each cell is `pass rate (proved/theorems)`; errors count as failures and are stated
    below the table, as is any benchmark not fully recorded.
    """
    benches = summary["benchmarks"]
    members = list(summary["members"])
    if len(members) == 1 and ensemble == "independent":
        row_names = members  # a single member: the ensemble row would repeat it
    else:
        row_names = members + [ENSEMBLE]
    header = ["model"] + [f"{info['label']} (n={info['recorded']})" for info in benches.values()]
    lines = [f"# {title}", "", describe_budget(summary["strategy"], budget, ensemble), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in row_names:
        cells = []
        for info in benches.values():
            row = info["rows"].get(name)
            cells.append(_pct(row) if row is not None and row["theorems"] else "—")
        label = f"**{name}**" if name == ENSEMBLE else name
        if name == ENSEMBLE:
            cells = [f"**{c}**" if c != "—" else c for c in cells]
        lines.append("| " + " | ".join([label] + cells) + " |")
    notes = []
    for bench, info in benches.items():
        ens = info["rows"][ENSEMBLE]
        if ens["errors"]:
            notes.append(f"- {info['label']}: {ens['errors']} theorem(s) could not be searched (counted as failed).")
        replay = info.get("replayability") or {}
        if replay.get("not_replayable"):
            reasons = ", ".join(f"{reason} {n}" for reason, n in replay["reasons"].items())
            notes.append(f"- {info['label']}: {replay['not_replayable']} of {replay['theorems']} theorem(s) not replayable ({reasons}), counted as failed.")
        if info["missing"]:
            notes.append(f"- {info['label']}: incomplete, {info['missing']} of the {info['expected']} selected theorems not recorded yet.")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "benchmark"


def write_plots(summary: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """One PNG per benchmark: pass rate against budget used, a step line per member and the ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metric = summary["usage_metric"]
    written: list[Path] = []
    for bench, info in summary["benchmarks"].items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        x_max = 1
        for name, row in info["rows"].items():
            x_max = max([x_max] + [x for x, _ in row["curve"]])
        for name, row in info["rows"].items():
            curve = row["curve"]
            xs = [0] + [x for x, _ in curve] + [x_max]
            ys = [0.0] + [100.0 * y for _, y in curve] + [100.0 * (curve[-1][1] if curve else 0.0)]
            style = {"linewidth": 2.0, "color": "black", "linestyle": "--"} if name == ENSEMBLE else {"linewidth": 1.6}
            ax.step(xs, ys, where="post", label=f"{name} ({100.0 * row['pass_rate']:.1f}%)", **style)
        ax.set_xlabel(f"{metric} used (per member)")
        ax.set_ylabel("theorems proved (%)")
        ax.set_title(f"{info['label']}: n = {info['recorded']}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out / f"pass_rate_{_slug(bench)}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
