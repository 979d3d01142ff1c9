"""The report's figures: metric against each cost with its Pareto frontier, and a rank × modules heat map."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainers.config import LORA_FAMILY

# (arm-table column, axis label, Pareto column, log scale)
COSTS = (("peak_mem_gb", None, "pareto", False),
         ("train_time_s", "train time (s)", "pareto_time", False),
         ("trainable_params", "trainable parameters", "pareto_params", True))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def pareto_png(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """One panel per cost (memory, time, trainable params): arms as points, full FT in black, the frontier
    in red. An arm on a frontier is one no other arm beats on both the metric and that cost."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COSTS), figsize=(6 * len(COSTS), 5))
    for ax, (cost, label, front_col, log) in zip(axes, COSTS):
        for _, r in table.iterrows():
            if r[cost] != r[cost] or r["test_mean"] != r["test_mean"]:
                continue
            color = "black" if r["method"] == "full" else ("tab:red" if r[front_col] else "tab:blue")
            ax.scatter(r[cost], r["test_mean"], color=color, s=40, zorder=3)
            if len(table) <= 12 or r[front_col] or r["method"] == "full":  # many arms: name the frontier only
                ax.annotate(r["arm"], (r[cost], r["test_mean"]), fontsize=6, xytext=(4, 2),
                            textcoords="offset points")
        front = table[table[front_col]].sort_values(cost)
        ax.step(front[cost], front["test_mean"], where="post", color="tab:red", lw=1, label="Pareto frontier")
        if log and (table[cost] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(label or table.attrs.get("memory_metric", "peak memory (GB)"))
        ax.set_ylabel(f"test {metric} (%)")
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"test {metric} vs cost (black: full fine-tuning; red: Pareto frontier)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rank_modules_heatmap(table: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Mean test metric per (rank, target modules) over LoRA-family arms, with the delta to full FT in each
    cell; None when the sweep has fewer than two ranks or module sets to lay out."""
    arms = table[table["method"].isin(LORA_FAMILY) & table["test_mean"].notna()]
    if arms.empty or arms["r"].nunique() * arms["target_modules"].nunique() < 2:
        return None
    grid = arms.pivot_table(index="target_modules", columns="r", values="test_mean", aggfunc="max")
    delta = arms.pivot_table(index="target_modules", columns="r", values="test_delta_pts", aggfunc="max")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(grid.columns) + 3, 0.8 * len(grid.index) + 2))
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [f"r={int(r)}" for r in grid.columns])
    ax.set_yticks(range(len(grid.index)), list(grid.index))
    for i in range(len(grid.index)):
        for j in range(len(grid.columns)):
            value, d = grid.values[i, j], delta.values[i, j]
            if value == value:
                text = f"{value:.1f}" + (f"\n({d:+.1f})" if d == d else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white")
    fig.colorbar(image, ax=ax, label=f"test {metric} (%)")
    ax.set_title(f"best test {metric} by rank x modules (Δ vs full FT, pts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
