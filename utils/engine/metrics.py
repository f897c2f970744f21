"""Classification metrics accumulated on the device (no host synchronisation until read).

``top-k`` accuracy: the percentage of samples whose label is among the ``k`` largest logits
(``k`` is capped at the number of classes, so top-5 of a 3-class problem is 100%).
"""
from __future__ import annotations

import torch

from utils.engine.distributed import all_reduce_sum

__all__ = ["topk_correct", "MetricSums"]


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is within the top ``k`` logits, for each ``k`` (float tensor)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1, largest=True, sorted=True).indices
    hits = pred.eq(target.view(-1, 1))
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]).to(torch.float64)


class MetricSums:
    """Running sums ``[loss * n, correct@1, correct@5, n]`` kept as one float64 tensor on ``device``."""

    def __init__(self, device: torch.device | str):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``loss`` is the batch mean (a 0-d tensor); nothing here reads values back to the host."""
        n = target.shape[0]
        correct = topk_correct(logits.detach(), target)
        self.sums[0] += loss.detach().to(torch.float64) * n
        self.sums[1:3] += correct
        self.sums[3] += n

    def all_reduce(self) -> "MetricSums":
        all_reduce_sum(self.sums)
        return self

    def reset(self) -> None:
        self.sums.zero_()

    def read(self) -> dict[str, float]:
        """One device-to-host copy: ``loss`` (mean), ``top1``/``top5`` (percent), ``num_samples``."""
        loss_sum, c1, c5, n = self.sums.tolist()
        if n == 0:
            return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "num_samples": 0}
        return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "num_samples": int(n)}
