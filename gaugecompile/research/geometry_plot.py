"""The attention-geometry probes (`geometry.probe_geometry`) drawn per layer, one PNG of three panels.

Shared by `gaugecompile probe` and the wind-tunnel example, which both write the probes of a model as a picture:
key orthogonality (mean and largest |cos|), attention entropy (every head, and the mean over heads with its
spread) and the value manifold (PC1's share of the variance, |corr(PC1, entropy)|).  matplotlib loads on call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .geometry import LayerGeometry

__all__ = ["plot_geometry"]


def plot_geometry(layers: Sequence[LayerGeometry], path: Path, title: str) -> None:
    """Write the probes of `layers` to the PNG at `path`, under `title`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [g.layer for g in layers]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [g.key_abs_cos_mean for g in layers], "o-", label="mean |cos|")
    axes[0].plot(x, [g.key_abs_cos_max for g in layers], "s--", label="max |cos|")
    axes[0].set(title="key orthogonality", xlabel="layer", ylabel="|cos| between distinct keys")
    axes[0].legend()
    for g in layers:
        axes[1].scatter([g.layer] * len(g.entropy_bits), g.entropy_bits, s=8, alpha=0.4, color="grey")
    mean = [sum(g.entropy_bits) / len(g.entropy_bits) for g in layers]
    spread = [sum(g.entropy_spread_bits) / len(g.entropy_spread_bits) for g in layers]
    axes[1].errorbar(x, mean, yerr=spread, fmt="o-", capsize=3, label="mean over heads (bar: spread)")
    axes[1].set(title="attention entropy", xlabel="layer", ylabel="bits")
    axes[1].legend()
    axes[2].plot(x, [g.value_pc_share[0] for g in layers], "o-", label="PC1 share of variance")
    axes[2].plot(x, [abs(g.value_pc1_entropy_corr) for g in layers], "s--", label="|corr(PC1, entropy)|")
    axes[2].set(title="value manifold", xlabel="layer", ylim=(0, 1))
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
