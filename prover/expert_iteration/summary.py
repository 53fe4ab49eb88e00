"""The table across iterations: proved counts and pass rates per member and ensemble.

Built only from the completed stage manifests (never from in-memory counters), so it can
be rebuilt at any time: `summary.json`, `summary.md` and `summary.png` at the run root.
Pass rates are fractions in [0, 1] (the Markdown shows percentages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prover.expert_iteration.stages import StageStore, atomic_write_json


def collect(root: Path, last_iteration: int) -> list[dict[str, Any]]:
    """One row per iteration whose stages are recorded, in order."""
    store = StageStore(root)
    rows: list[dict[str, Any]] = []
    proved_total = 0
    for i in range(last_iteration + 1):
        data = store.completed(i, "data")
        if data is None:
            break
        search = store.completed(i, "search") if i > 0 else None
        evaluation = store.completed(i, "eval")
        counts = data["counts"]
        proved_total += counts.get("proved", 0)
        rows.append({
            "iteration": i,
            "searched": search["counts"]["searched"] if search else 0,
            "proved": counts.get("proved", 0),
            "proved_total": proved_total,
            "unproved": counts.get("unproved_after", counts.get("unproved", 0)),
            "pairs_added": counts.get("pairs_added", 0),
            "duplicates_skipped": counts.get("duplicates_skipped", 0),
            "train_pairs": counts["train_pairs"],
            "eval": evaluation["counts"]["rows"] if evaluation else None,
            "eval_benchmark": evaluation["counts"].get("benchmark") if evaluation else None,
            "eval_overlap_with_training": evaluation["counts"].get("overlap_with_training") if evaluation else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    members = sorted({m for r in rows if r["eval"] for m in r["eval"]}, key=lambda m: (m == "ensemble", m))
    header = ["iteration", "searched", "proved", "proved total", "unproved", "pairs added", "train pairs",
              *[f"eval {m}" for m in members]]
    benches = sorted({r["eval_benchmark"] for r in rows if r.get("eval_benchmark")})
    intro = ["# Expert iteration", ""]
    if benches:
        overlaps = [r["eval_overlap_with_training"] for r in rows if r.get("eval_overlap_with_training") is not None]
        intro += [f"Pass rates (eval columns) on {', '.join(benches)}, the same theorems at every iteration; "
                  f"theorems of it whose proofs were trained on: {max(overlaps) if overlaps else 0}.", ""]
    lines = [*intro, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r[k]) for k in ("iteration", "searched", "proved", "proved_total", "unproved", "pairs_added", "train_pairs")]
        for m in members:
            row = (r["eval"] or {}).get(m)
            cells.append("-" if row is None else f"{row['proved']}/{row['theorems']} ({100 * row['pass_rate']:.1f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    its = [r["iteration"] for r in rows]
    left.plot(its, [r["proved_total"] for r in rows], marker="o", label="proved (cumulative)")
    left.plot(its, [r["unproved"] for r in rows], marker="s", label="unproved")
    left.set_xlabel("iteration")
    left.set_ylabel("theorems")
    left.legend()
    members = sorted({m for r in rows if r["eval"] for m in r["eval"]})
    for m in members:
        points = [(r["iteration"], r["eval"][m]["pass_rate"]) for r in rows if r["eval"] and m in r["eval"]]
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m)
    right.set_xlabel("iteration")
    right.set_ylabel("pass rate")
    right.set_ylim(0, 1)
    if members:
        right.legend()
    for axis in (left, right):
        axis.set_xticks(its)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_summary(root: Path, last_iteration: int) -> dict[str, Any]:
    rows = collect(root, last_iteration)
    summary = {"iterations": rows}
    atomic_write_json(root / "summary.json", summary)
    tmp = root / "summary.md.tmp"
    tmp.write_text(markdown(rows))
    tmp.replace(root / "summary.md")
    plot(rows, root / "summary.png")
    return summary
