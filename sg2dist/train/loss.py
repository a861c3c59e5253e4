"""StyleGAN2 losses: non-saturating logistic loss, lazy R1, path length regularisation.

Each function computes the loss of one phase for one micro-batch and returns it
already multiplied by its lazy-regularisation gain, plus the statistics the loop
reports. None of them calls backward: the loop owns backward, gradient sync and
optimizer steps.

Every image D sees goes through `augment` first (identity unless augment.mode is set):
fakes and reals, in the G and D phases and in the R1 pass, as in the official ADA loss.
R1 differentiates D(augment(x)) with respect to the un-augmented x. The statistic
`augment_rt` = E[sign(D(augment(x_real)))] is ADA's overfitting heuristic r_t.

`G_ddp` / `D_ddp` may be DDP-wrapped modules (their forward must run through the
wrapper so DDP knows a backward is coming); `G_net` / `D_net` are the plain
modules, used where no gradient flows into that network's parameters so DDP's
reducer is not armed for a backward that never reaches it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch
import torch.nn.functional as F

# Scales a loss before autograd.grad (fp16 gradient penalties, the AMP recipe).
Scaler = Callable[[torch.Tensor], torch.Tensor]
# What D's inputs go through (sg2dist.augment); identity when augmentation is off.
Augment = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rt(real_logits: torch.Tensor) -> torch.Tensor:
    return real_logits.detach().sign().float().mean()


def g_main_loss(G_ddp, D_net, gen_z, gen_c, style_mixing_prob: float, augment: Augment = _identity):
    """Non-saturating logistic loss for G: softplus(-D(G(z)))."""
    gen_img = G_ddp(gen_z, gen_c, style_mixing_prob=style_mixing_prob)
    gen_logits = D_net(augment(gen_img), gen_c)
    loss = F.softplus(-gen_logits).mean()
    return loss, {"loss_G": loss.detach(), "D_fake_G": gen_logits.detach().mean()}


def d_fake_loss(G_net, D_ddp, gen_z, gen_c, style_mixing_prob: float, augment: Augment = _identity):
    """D's logistic loss on fakes, softplus(D(G(z))); no gradient flows into G."""
    with torch.no_grad():
        # update_emas: the mapping net tracks w_avg on the fakes D sees, as in the official code.
        gen_img = G_net(gen_z, gen_c, style_mixing_prob=style_mixing_prob, update_emas=True)
    gen_logits = D_ddp(augment(gen_img), gen_c)
    loss = F.softplus(gen_logits).mean()
    return loss, {"loss_D_fake": loss.detach(), "D_fake": gen_logits.detach().mean()}


def can_combine_d_calls(batch: int, mbstd_group: int) -> bool:
    """Whether fakes and reals can share one D call with the groups of two separate calls."""
    return batch >= mbstd_group and batch % mbstd_group == 0


def d_main_loss(
    G_net,
    D_ddp,
    real_img,
    real_c,
    gen_z,
    gen_c,
    style_mixing_prob: float,
    mbstd_group: int,
    augment: Augment = _identity,
):
    """D's logistic loss on fakes and reals in ONE D call (half the kernel launches).

    Minibatch stddev groups sample i with i + N/G, i + 2N/G, ...; interleaving the two
    halves per group keeps every group all-fake or all-real, exactly the groups that two
    separate calls would form, so the result equals d_fake_loss + d_real_loss (fakes are
    augmented before reals, in the same order as the two calls).
    """
    with torch.no_grad():
        gen_img = G_net(gen_z, gen_c, style_mixing_prob=style_mixing_prob, update_emas=True)
    gen_img = augment(gen_img)
    real_img = augment(real_img)
    n, G = len(real_img), mbstd_group

    def interleave(fake, real):  # [n, ...] x 2 -> [2n, ...], groups stay pure
        both = torch.stack(
            [fake.reshape(G, n // G, *fake.shape[1:]), real.reshape(G, n // G, *real.shape[1:])],
            dim=1,
        )
        return both.reshape(2 * n, *fake.shape[1:])

    logits = D_ddp(interleave(gen_img, real_img), interleave(gen_c, real_c))
    logits = logits.reshape(G, 2, n // G)
    gen_logits, real_logits = logits[:, 0].reshape(n), logits[:, 1].reshape(n)
    loss_fake, loss_real = F.softplus(gen_logits).mean(), F.softplus(-real_logits).mean()
    stats = {
        "loss_D_fake": loss_fake.detach(), "D_fake": gen_logits.detach().mean(),
        "loss_D_real": loss_real.detach(), "D_real": real_logits.detach().mean(),
        "augment_rt": _rt(real_logits),
    }  # fmt: skip
    return loss_fake + loss_real, stats


def d_real_loss(D_ddp, real_img, real_c, augment: Augment = _identity):
    """D's logistic loss on reals, softplus(-D(x)).

    A separate D call and backward from the fakes: minibatch stddev groups must not
    mix reals and fakes, and DDP allows one forward per backward.
    """
    real_logits = D_ddp(augment(real_img), real_c)
    loss = F.softplus(-real_logits).mean()
    stats = {"loss_D_real": loss.detach(), "D_real": real_logits.detach().mean()}
    return loss, {**stats, "augment_rt": _rt(real_logits)}


def r1_loss(
    D_ddp,
    real_img,
    real_c,
    *,
    r1_gamma: float,
    gain: float,
    scale: Scaler = _identity,
    augment: Augment = _identity,
):
    """R1: (r1_gamma / 2) * ||dD(x)/dx||^2 on reals, times the lazy interval `gain`.

    `scale` multiplies the logits before autograd.grad and is divided out after,
    the AMP recipe that keeps fp16 input gradients from underflowing.
    """
    real_img = real_img.detach().requires_grad_(True)
    real_logits = D_ddp(augment(real_img), real_c)
    (scaled_grads,) = torch.autograd.grad(
        outputs=scale(real_logits.sum()), inputs=real_img, create_graph=True
    )
    inv_scale = 1.0 / scale(torch.ones((), device=real_img.device))
    r1_grads = scaled_grads * inv_scale
    r1_penalty = r1_grads.float().square().sum(dim=[1, 2, 3])
    # `real_logits * 0` keeps every D parameter in the graph (the output bias has no
    # input gradient), so DDP sees a gradient for each and its reducer completes.
    loss = (real_logits.squeeze(1) * 0 + r1_penalty * (r1_gamma / 2)).mean() * gain
    stats = {"loss_r1": r1_penalty.detach().mean(), "D_real_r1": real_logits.detach().mean()}
    return loss, {**stats, "augment_rt": _rt(real_logits)}


def path_lengths(G_ddp, gen_z, gen_c, style_mixing_prob: float, scale: Scaler = _identity):
    """Per-sample |J_w^T y| for random image-space y; returns (lengths [N], gen_img)."""
    gen_img, gen_ws = G_ddp(gen_z, gen_c, style_mixing_prob=style_mixing_prob, return_ws=True)
    res = gen_img.shape[2] * gen_img.shape[3]
    pl_noise = torch.randn_like(gen_img) / res**0.5
    (scaled_grads,) = torch.autograd.grad(
        outputs=scale((gen_img * pl_noise).sum()), inputs=gen_ws, create_graph=True
    )
    inv_scale = 1.0 / scale(torch.ones((), device=gen_img.device))
    pl_grads = scaled_grads * inv_scale
    lengths = pl_grads.float().square().sum(dim=2).mean(dim=1).sqrt()
    return lengths, gen_img


def pl_loss(lengths, gen_img, *, pl_mean: float | torch.Tensor, pl_weight: float, gain: float):
    """Path length penalty (lengths - pl_mean)^2 * pl_weight, times the lazy interval `gain`.

    `pl_mean` is the running mean from before this phase; the loop updates it once per
    phase from the mean over the whole global batch, so the result does not depend on
    how the batch is split over ranks and micro-batches.
    """
    # A float64 scalar pl_mean meets float32 lengths as float32, as a Python float would.
    pl_penalty = (lengths - pl_mean).square()
    # `gen_img[:, 0, 0, 0] * 0`: see r1_loss, keeps DDP's reducer complete.
    loss = (gen_img[:, 0, 0, 0].float() * 0 + pl_penalty * pl_weight).mean() * gain
    return loss, {"loss_pl": pl_penalty.detach().mean(), "pl_length": lengths.detach().mean()}


@overload
def update_pl_mean(pl_mean: float, batch_mean_length: float, pl_decay: float) -> float: ...


@overload
def update_pl_mean(
    pl_mean: torch.Tensor, batch_mean_length: float | torch.Tensor, pl_decay: float
) -> torch.Tensor: ...


def update_pl_mean(
    pl_mean: float | torch.Tensor, batch_mean_length: float | torch.Tensor, pl_decay: float
) -> float | torch.Tensor:
    """Exponential moving average of path lengths (decay 0.01 in the paper); in float64 when
    pl_mean is a float64 tensor, so a float32 batch mean is widened exactly, as float() did."""
    return pl_mean + (batch_mean_length - pl_mean) * pl_decay


def lazy_adam_hparams(lr: float, betas: list[float], reg_interval: int) -> tuple[float, tuple]:
    """Lazy-regularisation correction of Adam: with c = I/(I+1), lr x c and betas ^ c.

    Regularising every I steps with the loss multiplied by I changes the effective
    step size; the paper corrects for it so lazy and non-lazy training match.
    """
    if reg_interval <= 0:
        return lr, (betas[0], betas[1])
    c = reg_interval / (reg_interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)
