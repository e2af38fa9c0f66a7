"""What an adaptation run returns, and how it is written to disk."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class AdaptResult:
    """merged_state_dict: the final merged model (base dtypes); coefficients: [T] or [K, T] as used
    in the final merge; keys: the merged tensor names (rows of layer-wise coefficients); mask: the
    final (rescaled) shared mask per key, or None; history: one dict per optimisation step."""
    merged_state_dict: dict[str, torch.Tensor]
    coefficients: torch.Tensor
    keys: list[str]
    mask: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    mask_logits: dict[str, torch.Tensor] | None = None   # Concrete's learned logits: a later run can start here

    def save_side_files(self, out_dir: str | os.PathLike) -> None:
        """adapt_result.safetensors (coefficients, mask) + adapt_result.json (config, history)."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        tensors = {"coefficients": self.coefficients.detach().float().cpu().contiguous()}
        if self.mask is not None:
            tensors.update({f"mask.{k}": m.detach().float().cpu().contiguous() for k, m in self.mask.items()})
        if self.mask_logits is not None:
            tensors.update({f"mask_logits.{k}": x.detach().float().cpu().contiguous()
                            for k, x in self.mask_logits.items()})
        save_file(tensors, str(out / "adapt_result.safetensors"))
        coeffs = self.coefficients.detach().cpu().tolist()
        doc = {"config": self.config, "keys": self.keys, "coefficients": coeffs,
               "coefficient_rows": "tasks" if self.coefficients.dim() == 1 else "keys x tasks",
               "history": self.history}
        (out / "adapt_result.json").write_text(json.dumps(doc, indent=1))


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Entropy over steps and, where recorded, average validation accuracy (second axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "entropy" in h]
    ax.plot(steps, [h["entropy"] for h in history if "entropy" in h], color="tab:blue", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean entropy per task batch", color="tab:blue")
    acc = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if acc:
        ax2 = ax.twinx()
        ax2.plot([a[0] for a in acc], [a[1] for a in acc], "o-", color="tab:red", ms=3)
        ax2.set_ylabel("average validation accuracy", color="tab:red")
    stages = sorted({h.get("stage") for h in history if h.get("stage")}, key=lambda s: next(
        h["step"] for h in history if h.get("stage") == s))
    for s in stages[1:]:
        first = next(h["step"] for h in history if h.get("stage") == s)
        ax.axvline(first, color="grey", ls="--", lw=0.8)
        ax.text(first, ax.get_ylim()[1], f" {s}", va="top", fontsize=8, color="grey")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
