"""Plots of a training run's history (PNG in the model directory; none on object storage)."""

from __future__ import annotations

from tagray.data import storage


def plot_history(history: list[dict], out: str) -> str | None:
    """loss (and mean π for RLR) against training step (PNG in the model directory)."""
    if storage.is_remote(out) or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    with_pi = "mean_pi" in history[-1]
    fig, axes = plt.subplots(1, 2 if with_pi else 1, figsize=(9 if with_pi else 4.5, 3.2), squeeze=False)
    ax = axes[0]
    ax[0].plot(steps, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="step", ylabel="training loss per image", title="loss")
    if with_pi:
        ax[1].plot(steps, [h["mean_pi"] for h in history], marker="o", color="C1")
        ax[1].set(xlabel="step", ylabel="mean π over tags", title="tagging likelihood π")
    fig.tight_layout()
    path = storage.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def plot_epochs(history: list[dict], out: str, title: str) -> str | None:
    """Training loss and validation mAP against epoch (PNG in the model directory)."""
    if storage.is_remote(out) or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(epochs, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="training loss", title=title)
    ax[1].plot(epochs, [h.get("val_map", float("nan")) for h in history], marker="o", color="C1")
    ax[1].set(xlabel="epoch", ylabel="validation mAP per label", title="validation")
    fig.tight_layout()
    path = storage.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
