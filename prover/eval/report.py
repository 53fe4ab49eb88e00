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


def _row_label(name: str, summary: Mapping[str, Any]) -> str:
    if name == ENSEMBLE:
        return f"**{name}**"
    if name == summary.get("baseline"):
        return f"{name} (equal compute)"
    return name


def _row_names(summary: Mapping[str, Any], ensemble: str) -> list[str]:
    members = list(summary["members"])
    names = members if len(members) == 1 and ensemble == "independent" else members + [ENSEMBLE]
    if summary.get("baseline"):
        names.append(summary["baseline"])
    return names


def _compute(summary: Mapping[str, Any], name: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for info in summary["benchmarks"].values():
        row = info["rows"].get(name)
        for key, value in ((row or {}).get("compute") or {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def table_markdown(summary: Mapping[str, Any], *, budget: Mapping[str, Any], ensemble: str, title: str = "Evaluation") -> str:
    """Table 2's shape: rows are the members, the ensemble and the equal-compute baseline;
    per benchmark a pass-rate column (`pass rate (proved/theorems)`, every recorded theorem
    in the denominator) and an error column; then the compute each row spent over all
    benchmarks (passes or expansions, generator calls, Lean calls, wall time; for sampling
    also the distinct tactic sequences the passes tried). Table 4 (pass@n) follows for
    sampling runs."""
    benches = summary["benchmarks"]
    metric = summary.get("usage_metric", "expansions")
    row_names = _row_names(summary, ensemble)
    header = ["model"]
    for info in benches.values():
        header += [f"{info['label']} (n={info['recorded']})", "errors"]
    header += [metric, "generator calls", "Lean calls", "wall time (s)"]
    if metric == "passes":
        header.append("distinct trajectories")
    lines = [f"# {title}", "", describe_budget(summary["strategy"], budget, ensemble), ""]
    if summary.get("baseline"):
        lines += [f"`{summary['baseline']}`: the baseline member searched alone with the compute of the whole ensemble "
                  "(its passes/expansions and wall clock multiplied by the number of members).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in row_names:
        cells = []
        for info in benches.values():
            row = info["rows"].get(name)
            cell = _pct(row) if row is not None and row["theorems"] else "—"
            if name == ENSEMBLE and cell != "—":
                cell = f"**{cell}**"
            cells += [cell, str(row["errors"]) if row is not None else "—"]
        compute = _compute(summary, name)
        cells += [
            f"{compute.get(metric, 0):.0f}",
            f"{compute.get('generator_calls', 0):.0f}",
            f"{compute.get('lean_calls', 0):.0f}",
            f"{compute.get('wall_time_s', 0):.1f}",
        ]
        if metric == "passes":
            cells.append(str(sum(int(info["rows"].get(name, {}).get("distinct_trajectories_total", 0)) for info in benches.values())))
        lines.append("| " + " | ".join([_row_label(name, summary)] + cells) + " |")
    notes = []
    for bench, info in benches.items():
        ens = info["rows"][ENSEMBLE]
        if ens["errors"]:
            notes.append(
                f"- {info['label']}: {ens['errors']} theorem(s) ended in an error (not searched: see summary.json); they stay "
                "in the denominator, and `--resume` retries them."
            )
        replay = info.get("replayability") or {}
        if replay.get("not_replayable"):
            reasons = ", ".join(f"{reason} {n}" for reason, n in replay["reasons"].items())
            notes.append(
                f"- {info['label']}: {replay['not_replayable']} of {replay['theorems']} theorem(s) not replayable ({reasons}): "
                "in the denominator as not proved, not errors."
            )
        if info["missing"]:
            notes.append(f"- {info['label']}: incomplete, {info['missing']} of the {info['expected']} selected theorems not recorded yet.")
    if notes:
        lines += ["", *notes]
    table4 = pass_at_markdown(summary, ensemble)
    if table4:
        lines += ["", table4.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _label_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def pass_at_markdown(summary: Mapping[str, Any], ensemble: str = "independent") -> str:
    """Table 4: pass@{16, 64, 256, 1k, 4k} per row and benchmark from the same sampling run
    (columns up to the largest budget; `—` past a row's own passes). Empty for best-first."""
    from prover.eval.summary import PASS_AT

    if summary.get("usage_metric") != "passes":
        return ""
    row_names = _row_names(summary, ensemble)
    out: list[str] = []
    for info in summary["benchmarks"].values():
        rows = {name: info["rows"][name] for name in row_names if name in info["rows"] and "pass_at" in info["rows"][name]}
        if not rows:
            continue
        limits = {row["pass_at_limit"] for row in rows.values()}
        columns = sorted({n for n in PASS_AT if n <= max(limits)} | limits)
        out += [f"## pass@n: {info['label']} (n={info['recorded']})", ""]
        out.append("| model | " + " | ".join(f"pass@{_label_n(n)}" for n in columns) + " |")
        out.append("|" + "---|" * (len(columns) + 1))
        for name, row in rows.items():
            cells = [f"{100.0 * row['pass_at'][str(n)]:.1f}%" if str(n) in row["pass_at"] else "—" for n in columns]
            out.append("| " + " | ".join([_row_label(name, summary)] + cells) + " |")
        out.append("")
    if out:
        out.append(
            "pass@n: mean over theorems of [first successful pass ≤ n] from one run of N passes per member (unbiased for n ≤ N; "
            "with --all-passes, 1 - C(N-c, n)/C(N, n) from the c successful passes); the ensemble counts a theorem when any "
            "member's first success is within its own first n passes; — : n beyond that row's passes."
        )
    return "\n".join(out) + ("\n" if out else "")


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
        written.append(_save_plot(plt, fig, ax, out / f"pass_rate_{_slug(bench)}.png"))
    return written


def _save_plot(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    """The plots' shared finish (y from 0, grid, legend), written to `path` and closed."""
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_pass_at_plots(summary: Mapping[str, Any], directory: str | Path, ensemble: str = "independent") -> list[Path]:
    """One PNG per benchmark of a sampling run: pass@n against n (log scale) per row."""
    if summary.get("usage_metric") != "passes":
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for bench, info in summary["benchmarks"].items():
        rows = {name: info["rows"][name] for name in _row_names(summary, ensemble) if "pass_at" in info["rows"].get(name, {})}
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for name, row in rows.items():
            points = sorted((int(n), 100.0 * v) for n, v in row["pass_at"].items())
            style = {"linewidth": 2.0, "color": "black", "linestyle": "--"} if name == ENSEMBLE else {"linewidth": 1.6, "marker": "o", "markersize": 3}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=str(_row_label(name, summary)).strip("*"), **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n (passes per member)")
        ax.set_ylabel("pass@n (%)")
        ax.set_title(f"{info['label']}: pass@n, n = {info['recorded']} theorems")
        written.append(_save_plot(plt, fig, ax, out / f"pass_at_n_{_slug(bench)}.png"))
    return written
