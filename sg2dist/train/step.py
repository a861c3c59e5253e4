"""One training iteration: the phase table of the official code, accumulation, sync points.

    phase  network  every       loss
    Gmain  G        step        softplus(-D(G(z)))
    Greg   G        pl_interval path length penalty x pl_interval
    Dmain  D        step        softplus(D(G(z))) + softplus(-D(x))
    Dreg   D        r1_interval R1 x r1_interval

Each phase zeroes its network's gradients, runs every micro-batch of the global
batch (backward without DDP sync, except the very last backward, where DDP
all-reduces the accumulated gradients), checks that the gradients are finite, and
steps its optimizer.

Randomness (latents, noise inputs, style-mixing crossovers, path-length noise) is
drawn after seeding torch from (seed, step, phase, global micro-batch index); the
augmentation of D's inputs draws from its own generator seeded from the same four
numbers. A step's result is therefore the same however the global batch is split over
ranks and micro-batches, and a resumed run continues exactly. With augment.mode=ada,
p is adjusted after every augment.interval-th step from r_t averaged over all ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sg2dist.augment import Augmenter, AugmentState, identity
from sg2dist.config import TrainConfig
from sg2dist.train import loss as L

if TYPE_CHECKING:
    from sg2dist.model import Discriminator, Generator


@dataclass(frozen=True)
class Phase:
    name: str
    net: str  # "G" or "D"
    interval: int  # run when step % interval == 0


def phase_table(train: TrainConfig) -> list[Phase]:
    phases = [Phase("Gmain", "G", 1)]
    if train.pl_interval > 0 and train.pl_weight > 0:
        phases.append(Phase("Greg", "G", train.pl_interval))
    phases.append(Phase("Dmain", "D", 1))
    if train.r1_interval > 0 and train.r1_gamma > 0:
        phases.append(Phase("Dreg", "D", train.r1_interval))
    return phases


def micro_seed(*ints: int) -> int:
    """A 63-bit seed that is a pure function of the given integers."""
    digest = hashlib.blake2b(repr(ints).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Nets:
    """The networks and optimizers; *_ddp may be DDP wrappers of *_net."""

    G_ddp: torch.nn.Module
    D_ddp: torch.nn.Module
    G_net: Generator
    D_net: Discriminator
    G_ema: Generator
    G_opt: torch.optim.Optimizer
    D_opt: torch.optim.Optimizer
    # `sg2dist bench step --compile` runs the main phases through compiled modules. The
    # regularisation phases need double backward, which torch.compile does not support, so
    # they keep the eager ones here. None = the default noted on each line.
    G_reg_ddp: torch.nn.Module | None = None  # G in Greg (G_ddp)
    D_reg_ddp: torch.nn.Module | None = None  # D in Dreg (D_ddp)
    G_fixed: torch.nn.Module | None = None  # G as a fixed function in Dmain (G_net)
    D_fixed: torch.nn.Module | None = None  # D as a fixed function in Gmain (D_net)


def _untimed(_name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass
class StepContext:
    """What a step needs besides the networks: config, layout, precision hooks."""

    train: TrainConfig
    phases: list[Phase]
    rank: int
    world_size: int
    backward: Callable[[torch.Tensor], None]  # accelerator.backward
    no_sync: Callable[[torch.nn.Module], AbstractContextManager[Any]]  # accelerator.no_sync
    autocast: Callable[[], AbstractContextManager[Any]]  # accelerator.autocast
    reduce_mean: Callable[[torch.Tensor], torch.Tensor]  # tensor -> mean over ranks
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    mbstd_group: int = 4  # D's minibatch-stddev group (model.mbstd_group)
    augmenter: Augmenter | None = None  # what D's inputs go through (None: nothing)
    # Wraps each phase and each optimizer step, named "Gmain".."Dreg", "opt_G", "opt_D":
    # `sg2dist bench step --profile` times them; training leaves it a no-op.
    phase_timer: Callable[[str], AbstractContextManager[Any]] = field(default=_untimed)
    # Per-phase loss statistics since the last tick; device tensors, so no sync per step.
    stats: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class StepState:
    """What one step hands to the next, kept on the training device: a step never reads a
    device value on the host, which would stall the queue of GPU work behind it (a sync).
    The loop reads them at ticks, snapshots and every few steps. pl_mean, skipped_steps
    and augment are checkpointed; a resumed run starts a fresh streak of non-finite steps."""

    pl_mean: torch.Tensor  # float64 scalar: running mean of path lengths
    skipped_steps: torch.Tensor  # int64 scalar: steps skipped for non-finite gradients, in all
    nonfinite_in_row: torch.Tensor  # int64 scalar: ... and in a row, up to the last step
    augment: AugmentState = field(default_factory=AugmentState)  # ADA's p and r_t accumulator

    @classmethod
    def on(cls, device: torch.device | str, augment: AugmentState | None = None) -> StepState:
        # float64: the running mean has the precision of the Python float it replaced.
        return cls(
            pl_mean=torch.zeros((), dtype=torch.float64, device=device),
            skipped_steps=torch.zeros((), dtype=torch.int64, device=device),
            nonfinite_in_row=torch.zeros((), dtype=torch.int64, device=device),
            augment=augment if augment is not None else AugmentState(),
        )


def _given(module: torch.nn.Module | None, default: torch.nn.Module) -> torch.nn.Module:
    # Not `module or default`: a compiled module's truth value asks for its len().
    return module if module is not None else default


def _scale_fn(ctx: StepContext):
    return ctx.scaler.scale if ctx.scaler is not None else L._identity


def _phase_passes(
    ctx: StepContext,
    nets: Nets,
    phase: Phase,
    pl_mean: torch.Tensor,
    real_img,
    real_c,
    gen_z,
    gen_c,
    aug: L.Augment,
):
    """The (forward -> loss) closures of one phase for one micro-batch; one backward each."""
    t = ctx.train
    mix = t.style_mixing_prob
    if phase.name == "Gmain":
        D_fixed = _given(nets.D_fixed, nets.D_net)
        return [lambda: L.g_main_loss(nets.G_ddp, D_fixed, gen_z, gen_c, mix, aug)]
    if phase.name == "Greg":
        n = max(len(gen_z) // t.pl_batch_shrink, 1)

        def greg():
            G_reg = _given(nets.G_reg_ddp, nets.G_ddp)
            lengths, gen_img = L.path_lengths(G_reg, gen_z[:n], gen_c[:n], mix, _scale_fn(ctx))
            return L.pl_loss(
                lengths, gen_img, pl_mean=pl_mean, pl_weight=t.pl_weight, gain=phase.interval
            )

        return [greg]
    if phase.name == "Dmain":
        G_fixed = _given(nets.G_fixed, nets.G_net)
        if L.can_combine_d_calls(len(real_img), ctx.mbstd_group):
            return [
                lambda: L.d_main_loss(
                    G_fixed,
                    nets.D_ddp,
                    real_img,
                    real_c,
                    gen_z,
                    gen_c,
                    mix,
                    ctx.mbstd_group,
                    aug,
                )
            ]
        return [
            lambda: L.d_fake_loss(G_fixed, nets.D_ddp, gen_z, gen_c, mix, aug),
            lambda: L.d_real_loss(nets.D_ddp, real_img, real_c, aug),
        ]
    if phase.name == "Dreg":
        return [
            lambda: L.r1_loss(
                _given(nets.D_reg_ddp, nets.D_ddp),
                real_img,
                real_c,
                r1_gamma=t.r1_gamma,
                gain=phase.interval,
                scale=_scale_fn(ctx),
                augment=aug,
            )
        ]
    raise ValueError(f"unknown phase {phase.name}")


def _set_trained(opt: torch.optim.Optimizer, requires_grad: bool) -> None:
    for group in opt.param_groups:
        for param in group["params"]:
            param.requires_grad_(requires_grad)


def _nonfinite_grads(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A bool device scalar: does any gradient of `module` hold inf or nan? No host sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    # One fused norm per tensor; inf or nan anywhere makes its norm non-finite.
    return ~torch.stack(torch._foreach_norm(grads)).isfinite().all()


# micro_seed's extra argument for the augmentation generator: a stream of its own, so the
# latents and noise of a step stay the same whether or not augmentation is on.
AUGMENT_STREAM = 1


def _run_phase(
    ctx: StepContext,
    nets: Nets,
    phase: Phase,
    state: StepState,
    step: int,
    phase_idx: int,
    micro_batches,
):
    is_G = phase.net == "G"
    ddp, opt = (nets.G_ddp, nets.G_opt) if is_G else (nets.D_ddp, nets.D_opt)
    # Only the trained network builds parameter gradients; the other is a fixed function.
    # Switched through the optimizers: layers frozen by Freeze-D (in no optimizer) stay off.
    _set_trained(nets.G_opt, is_G)
    _set_trained(nets.D_opt, not is_G)
    opt.zero_grad(set_to_none=True)
    num_rounds = len(micro_batches)
    phase_stats: dict[str, list[torch.Tensor]] = defaultdict(list)
    for round_idx, (real_img, real_c) in enumerate(micro_batches):
        global_micro = round_idx * ctx.world_size + ctx.rank
        torch.manual_seed(micro_seed(ctx.train.seed, step, phase_idx, global_micro))
        gen_z = torch.randn(len(real_img), nets.G_net.z_dim, device=real_img.device)
        gen_c = real_c[torch.randperm(len(real_c), device=real_c.device)]
        aug: L.Augment = identity
        if ctx.augmenter is not None:
            aug_seed = micro_seed(ctx.train.seed, step, phase_idx, global_micro, AUGMENT_STREAM)
            aug = ctx.augmenter.for_micro_batch(aug_seed, state.augment.p)
        passes = _phase_passes(ctx, nets, phase, state.pl_mean, real_img, real_c, gen_z, gen_c, aug)
        for pass_idx, compute in enumerate(passes):
            is_last = round_idx == num_rounds - 1 and pass_idx == len(passes) - 1
            # Sync point: DDP all-reduces gradients only in the very last backward.
            sync = contextlib.nullcontext() if is_last else ctx.no_sync(ddp)
            with sync:
                with ctx.autocast():
                    loss, stats = compute()
                ctx.backward(loss / num_rounds)
            for key, value in stats.items():
                phase_stats[key].append(value.float())
    return opt, phase_stats


def _step_optimizer(
    ctx: StepContext, nets: Nets, opt, is_G: bool, device: torch.device
) -> torch.Tensor:
    """Step unless gradients are non-finite; a bool device scalar, True if skipped."""
    if ctx.scaler is not None:
        # fp16: the shared GradScaler detects inf/nan, skips the step and lowers its scale
        # (accelerate reads the outcome on the host: fp16 keeps that sync).
        opt.step()
        return torch.tensor(bool(getattr(opt, "step_was_skipped", False)), device=device)
    skipped = _nonfinite_grads(nets.G_net if is_G else nets.D_net, device)
    # Fused Adam takes the GradScaler's `found_inf` protocol: with found_inf = 1 it leaves
    # parameters, moments and step counts as they were, decided on the device, where a
    # host-side `if` would wait for the gradients (a sync) in every phase.
    inner = getattr(opt, "optimizer", opt)  # under accelerate's AcceleratedOptimizer
    if not getattr(inner, "_step_supports_amp_scaling", False):
        raise TypeError(f"{type(inner).__name__} cannot skip a step on the device; use fused Adam")
    inner.found_inf, inner.grad_scale = skipped.float(), None
    try:
        opt.step()
    finally:
        del inner.found_inf, inner.grad_scale
    return skipped


def train_step(ctx: StepContext, nets: Nets, state: StepState, step: int, micro_batches) -> None:
    """Run every phase due at `step` on `micro_batches` [(real_img float NCHW, real_c)]."""
    device = state.skipped_steps.device
    any_skipped = torch.zeros((), dtype=torch.bool, device=device)
    for phase_idx, phase in enumerate(ctx.phases):
        if step % phase.interval != 0:
            continue
        with ctx.phase_timer(phase.name):
            opt, phase_stats = _run_phase(ctx, nets, phase, state, step, phase_idx, micro_batches)
            if ctx.augmenter is not None and "augment_rt" in phase_stats:
                ctx.augmenter.observe(state.augment, phase_stats["augment_rt"])
            if phase.name == "Greg":
                # One pl_mean update per phase from the global batch: independent of the layout.
                global_length = ctx.reduce_mean(torch.stack(phase_stats["pl_length"]).mean())
                state.pl_mean = L.update_pl_mean(state.pl_mean, global_length, ctx.train.pl_decay)
        with ctx.phase_timer(f"opt_{phase.net}"):
            any_skipped |= _step_optimizer(ctx, nets, opt, phase.net == "G", device)
        # Stats stay local tensors until the tick: no device sync per phase.
        for key, values in phase_stats.items():
            ctx.stats[key].append(torch.stack(values).mean())
    state.nonfinite_in_row = (state.nonfinite_in_row + 1) * any_skipped
    state.skipped_steps = state.skipped_steps + any_skipped
    if ctx.augmenter is not None:
        ctx.augmenter.after_step(state.augment, step + 1, ctx.reduce_mean)
    _set_trained(nets.G_opt, False)
    _set_trained(nets.D_opt, False)


def collect_stats(ctx: StepContext) -> dict[str, float]:
    """Means of the stats since the last call, averaged over ranks (one all-reduce)."""
    keys = sorted(ctx.stats)
    if not keys:
        return {}
    local = torch.stack([torch.stack(ctx.stats[k]).mean() for k in keys])
    ctx.stats.clear()
    return dict(zip(keys, ctx.reduce_mean(local).tolist(), strict=True))


@torch.no_grad()
def update_ema(
    G_ema: torch.nn.Module,
    G_net: torch.nn.Module,
    *,
    cur_nimg: int,
    batch: int,
    ema_kimg: float,
    ema_rampup: float | None,
) -> None:
    """G_ema <- lerp(G, G_ema, beta) with a half-life of ema_kimg; buffers copied."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
    ema_params: list[torch.Tensor] = list(G_ema.parameters())
    params = [p.detach() for p in G_net.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G_net.buffers(), strict=True):
        b_ema.copy_(b)
