"""The three epoch-driven schedules of MAML++: MSL, DA and CA (spec sections 2.4, 3 and 5.2), and the
step decay of the meta learning rate that Prototypical Networks use.

Each is a closed-form function of the integer epoch, so a resumed run lands on the same values.
"""
from __future__ import annotations

import math

from .config import Config


def msl_weights(epoch: int, steps: int, msl_epochs: int, floor: float = 0.03) -> list[float]:
    """MSL (multi-step loss): importance of the query loss after each inner step, while annealing.

    Starts uniform at 1/S; non-final steps decay by 1/(S*E) per epoch down to floor/S, the final step
    grows by (S-1)/(S*E) per epoch up to 1 - (S-1)*floor/S (spec 3.2, the reference schedule).
    """
    s, decay = steps, 1.0 / (steps * msl_epochs)
    low = floor / s
    weights = [max(1.0 / s - epoch * decay, low) for _ in range(s - 1)]
    weights.append(min(1.0 / s + epoch * (s - 1) * decay, 1.0 - (s - 1) * low))
    return weights


def step_weights(cfg: Config, epoch: int, steps: int, training: bool) -> list[float]:
    """Weight of the query loss after each of `steps` inner steps.

    MSL only while training and epoch < msl_epochs; otherwise the final step alone with weight 1
    (the discontinuous switch of spec 3.3). Evaluation always uses the final step alone.
    """
    o = cfg.outer
    if training and o.msl and epoch < o.msl_epochs:
        return msl_weights(epoch, steps, o.msl_epochs, o.msl_floor)
    return [0.0] * (steps - 1) + [1.0]


def second_order_at(cfg: Config, epoch: int) -> bool:
    """DA (derivative-order annealing): first order for epochs 0..da_epochs, second order after."""
    return cfg.inner.second_order and epoch > cfg.inner.da_epochs


def cosine_lr(cfg: Config, epoch: int) -> float:
    """CA: meta learning rate of an epoch, closed-form cosine from outer.lr to eta_min over all epochs.

    Piecewise constant per epoch like the reference's scheduler.step(epoch); computing it in closed
    form avoids the recursive-formula collapse some torch versions show (spec 5.2, bug 10).
    """
    o = cfg.outer
    if not o.ca:
        return o.lr
    return o.eta_min + (o.lr - o.eta_min) * (1 + math.cos(math.pi * epoch / cfg.train.epochs)) / 2


def meta_lr(cfg: Config, epoch: int) -> float:
    """The meta learning rate of an epoch: CA's cosine, times outer.lr_step_gamma for every
    outer.lr_step_epochs epochs completed (step decay; off when lr_step_epochs is 0)."""
    lr = cosine_lr(cfg, epoch)
    o = cfg.outer
    return lr * o.lr_step_gamma ** (epoch // o.lr_step_epochs) if o.lr_step_epochs else lr
