"""Plots shared by the report and the MLflow job runs (neurons kept per layer, score distributions), and the
matplotlib setup every plot uses. Stays below both: the jobs' tracking never imports the report."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    pyplot().close(fig)
    return out_png


def plot_neurons_kept(plans: dict[str, dict], out_png, title: str) -> Path:
    """MLP neurons kept per layer, a line per plan (label -> plan JSON), dense size dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    dense_size = None
    for label, plan in plans.items():
        kept = [len(layer["mlp_keep"]) for layer in plan["layers"]]
        ax.plot(range(len(kept)), kept, marker=".", label=label)
        dense_size = plan.get("intermediate_size_dense") or dense_size
    if dense_size:
        ax.axhline(dense_size, color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set(xlabel="layer", ylabel="MLP neurons kept", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_png)


def plot_layer_scores(scores: dict, out_png, title: str) -> Path:
    """Distribution of MLP neuron scores per layer (median and 5-95 % band, log scale) from a score file."""
    import torch

    plt = pyplot()
    layers = sorted((int(k.split(".")[1]), v) for k, v in scores.items() if k.startswith("mlp."))
    q = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    stats = torch.stack([torch.quantile(v.double().flatten(), q) for _, v in layers]).numpy()
    x = [i for i, _ in layers]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.fill_between(x, stats[:, 0], stats[:, 2], alpha=0.3, label="5-95 %")
    ax.plot(x, stats[:, 1], marker=".", label="median")
    if (stats > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="neuron score", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_png)
