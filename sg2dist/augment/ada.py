"""The ADA controller: p follows D's overfitting heuristic r_t = E[sign(D(x_real))].

Every `interval` steps (4), from the signs of D's raw outputs on reals since the last
adjustment (the Dmain and R1 passes, over every rank):

    p <- clamp(p + sign(r_t - target) x batch x interval / (speed_kimg x 1000), 0, p_max)

so p can move by 1 in `speed_kimg` (500) kimg. When D tells reals from fakes too easily
(r_t above the target 0.6), p rises; when it does not, p falls.

The accumulator holds sums of per-micro-batch sign means and their count. All micro-batches
have the same size, so sum / count over all ranks is the mean over the global batch,
whatever the layout: 2 processes produce the same p as 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ReduceMean = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AugmentState:
    """What one step hands to the next (and a checkpoint keeps): p and the r_t accumulator."""

    p: float = 0.0
    # Sums of per-micro-batch means of sign(D(real)) since the last adjustment, and how many.
    # Local to this rank between adjustments (a device tensor: no sync per step).
    rt_sum: torch.Tensor | float = 0.0
    rt_count: float = 0.0
    rt: float = float("nan")  # the r_t of the last adjustment (nan before the first)

    def accumulate(self, sign_means: list[torch.Tensor]) -> None:
        self.rt_sum = self.rt_sum + torch.stack(sign_means).float().sum()
        self.rt_count += len(sign_means)

    def global_accumulator(self, reduce_mean: ReduceMean, device: torch.device):
        """(sum, count) as means over ranks; a collective, so every rank must call it."""
        local = torch.stack(
            [
                torch.as_tensor(self.rt_sum, dtype=torch.float32, device=device).reshape(()),
                torch.tensor(self.rt_count, dtype=torch.float32, device=device),
            ]
        )
        total, count = reduce_mean(local).tolist()
        return total, count

    def to_dict(self, accumulator: tuple[float, float]) -> dict[str, Any]:
        """JSON for meta.json; `accumulator` from global_accumulator (equal on all ranks)."""
        rt = self.rt if math.isfinite(self.rt) else None  # JSON has no NaN
        return {"p": self.p, "rt_sum": accumulator[0], "rt_count": accumulator[1], "rt": rt}

    def load_dict(self, data: dict[str, Any]) -> None:
        self.p = float(data.get("p", 0.0))
        self.rt_sum = float(data.get("rt_sum", 0.0))
        self.rt_count = float(data.get("rt_count", 0.0))
        rt = data.get("rt")
        self.rt = float(rt) if rt is not None else float("nan")


def adjust_p(
    p: float, rt: float, *, target: float, batch: int, interval: int, speed_kimg: float,
    p_max: float,
) -> float:  # fmt: skip
    """One ADA step of p (see the module docstring)."""
    direction = math.copysign(1.0, rt - target) if rt != target else 0.0
    p = p + direction * batch * interval / (speed_kimg * 1000)
    return min(max(p, 0.0), p_max)


def maybe_adjust(
    state: AugmentState, completed_steps: int, reduce_mean: ReduceMean, *, target: float,
    batch: int, interval: int, speed_kimg: float, p_max: float,
) -> None:  # fmt: skip
    """After step `completed_steps` (1-based), adjust p if an interval is complete."""
    if completed_steps % interval != 0 or state.rt_count == 0:
        return
    # Sync point: one all-reduce and a host copy every `interval` steps (as the official code).
    assert isinstance(state.rt_sum, torch.Tensor)  # this interval accumulated at least once
    total, count = state.global_accumulator(reduce_mean, state.rt_sum.device)
    state.rt = total / count
    state.p = adjust_p(
        state.p, state.rt, target=target, batch=batch, interval=interval,
        speed_kimg=speed_kimg, p_max=p_max,
    )  # fmt: skip
    state.rt_sum, state.rt_count = 0.0, 0.0
