"""The hot layers of second-order MAML with hand-written double backwards: batch norm, convolution
and max-pooling (docs/design.md, "The hot layers").

Second-order MAML differentiates every layer's backward, and on a CPU torch's generic double backwards
were where a meta-iteration's time went (benchmarks/floor.py, BENCHMARKS.md). Each layer here is an
autograd Function whose backward is torch's fused first-backward kernel wrapped as a Function of its
own, so that `create_graph` works, and that Function's backward, the double backward, is written out.
A third derivative is never taken (MAML is second order), so those are once-differentiable.
tests/test_kernels.py checks each with gradgradcheck and against torch's double backward in float64.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_backward = torch.ops.aten.native_batch_norm_backward


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory format: the fused kernels take a much slower path when a gradient and the
    activations differ (channels-last against contiguous)."""
    return t.contiguous(memory_format=torch.channels_last) if _channels_last(x) else t.contiguous()


# ---- batch norm ----------------------------------------------------------------------------------
# Per channel, M elements: xhat = (x - mean) m with m = 1/sqrt(var + eps); y = gamma xhat + beta.
# First backward (gy -> gx, ggamma, gbeta): gx = gamma m (gy - mean(gy) - xhat mean(gy xhat)),
# ggamma = sum(gy xhat), gbeta = sum(gy). Its backward takes A = d/dgx, a = d/dggamma, b = d/dgbeta and
# returns the gradients for gy, x and gamma (derived in docs/design.md): two fused reductions (the same
# kernel, asked only for its per-channel sums) and two passes that combine three tensors with
# per-channel coefficients, where torch's generic double backward is a long chain of element-wise ops.
def batch_norm_train(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """Batch norm with batch statistics over every axis but 1 -> (y, mean, invstd); mean and invstd are
    the kernel's own statistics, detached."""
    return _BatchNorm.apply(x, gamma, beta, eps)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        y, mean, invstd = torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, gamma, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        x, gamma, mean, invstd = ctx.saved_tensors
        gx, ggamma, gbeta = _BatchNormBackward.apply(gy, x, gamma, mean, invstd, ctx.eps)
        return gx, ggamma, gbeta, None


class _BatchNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, gamma, mean, invstd, eps):
        gy = _like(gy, x)
        gx, ggamma, gbeta = _backward(gy, x, gamma, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(gy, x, gamma, mean, invstd, ggamma, gbeta)
        ctx.eps = eps
        return gx, ggamma, gbeta

    @staticmethod
    @once_differentiable
    def backward(ctx, A, a, b):
        gy, x, gamma, mean, invstd, ggamma, gbeta = ctx.saved_tensors
        eps, M, m = ctx.eps, x.numel() // x.shape[1], invstd
        A = _like(A, x)
        per_channel = lambda t: t.view(1, -1, *[1] * (x.dim() - 2))
        # Per-channel sums from the fused kernel: sum(A xhat), sum(A), and sum(A gy) (gy as the "input"
        # with mean 0 and invstd 1).
        _, sum_a_xhat, sum_a = _backward(A, x, None, None, None, mean, invstd, True, eps, [False, True, True])
        sum_a_gy = _backward(A, gy, None, None, None, torch.zeros_like(mean), torch.ones_like(invstd), True, eps,
                             [False, True, False])[1]
        gy_bar, gyxhat_bar, a_bar = gbeta / M, ggamma / M, sum_a / M
        p = sum_a_gy - gy_bar * sum_a
        gm2 = gamma * m * m
        c_a = -gm2 * gyxhat_bar
        c_gy = a * m - gm2 * sum_a_xhat / M
        c_xhat = -gm2 * (p - 3 * gyxhat_bar * sum_a_xhat) / M - a * m * gyxhat_bar
        c_0 = -c_gy * gy_bar - c_a * a_bar
        # xhat = (x - mean) m is folded into x's coefficient and the constant.
        g_x = torch.addcmul(per_channel(c_0 - c_xhat * m * mean), gy, per_channel(c_gy))
        g_x.addcmul_(A, per_channel(c_a)).addcmul_(x, per_channel(c_xhat * m))
        k = a - gamma * m * sum_a_xhat / M
        g_gy = torch.addcmul(per_channel(b - gamma * m * a_bar - k * m * mean), A, per_channel(gamma * m))
        g_gy.addcmul_(x, per_channel(k * m))
        g_gamma = m * (p - gyxhat_bar * sum_a_xhat)
        return g_gy, g_x, g_gamma, None, None, None


# ---- convolution ---------------------------------------------------------------------------------
_conv, _conv_backward = torch.ops.aten.convolution, torch.ops.aten.convolution_backward


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int = 1, padding: int = 0,
           groups: int = 1) -> torch.Tensor:
    """F.conv2d whose double backward uses the convolution kernels themselves.

    torch's generic double backward of a grouped convolution computes the weight-gradient terms one
    group at a time, as convolutions of transposed tensors with image-sized kernels: the slowest
    convolution shapes of a second-order meta-iteration (benchmarks/floor.py). The first backward
    is torch's `convolution_backward`; its gradients are bilinear (gx in (gy, w), gw in (gy, x), gb
    in gy), so its backward, given A = d/dgx, Aw = d/dgw, Ab = d/dgb, is
      d/dgy = conv(A, w) + conv(x, Aw) + Ab,  d/dw = weight-gradient of conv(A, .) at gy,
      d/dx = input-gradient of conv(., Aw) at gy,
    each one call of the same fused kernels with the task-folded groups.
    """
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):  # as autocast does for F.conv2d (bf16)
        dtype = torch.get_autocast_dtype(device)
        x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    return _Conv.apply(x, w, b, stride, padding, groups)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, groups):
        ctx.save_for_backward(x, w)
        ctx.geometry, ctx.bias = (stride, padding, groups), b is not None
        return _conv(x, w, b, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx, gw, gb = _ConvBackward.apply(gy, x, w, ctx.needs_input_grad[0], ctx.bias, *ctx.geometry)
        return gx, gw, gb, None, None, None


class _ConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, w, need_x, need_b, stride, padding, groups):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gy, x, w)
        ctx.geometry = ([stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups)
        bias = [w.shape[0]] if need_b else None
        return tuple(_conv_backward(gy, x, w, bias, *ctx.geometry, [need_x, True, need_b]))

    @staticmethod
    @once_differentiable
    def backward(ctx, a_x, a_w, a_b):
        gy, x, w = ctx.saved_tensors
        stride, padding, dilation, _, _, groups = ctx.geometry
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        g_gy = g_x = g_w = None
        if need_gy:
            terms = []
            if a_x is not None:
                terms.append(_conv(a_x, w, None, stride, padding, dilation, False, [0, 0], groups))
            if a_w is not None:
                terms.append(_conv(x, a_w, None, stride, padding, dilation, False, [0, 0], groups))
            if a_b is not None:
                terms.append(a_b.view(1, -1, 1, 1).expand_as(gy))
            g_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and a_w is not None:
            g_x = _conv_backward(gy, x, a_w, None, *ctx.geometry, [True, False, False])[0]
        if need_w and a_x is not None:
            g_w = _conv_backward(gy, a_x, w, None, *ctx.geometry, [False, True, False])[1]
        return g_gy, g_x, g_w, None, None, None, None, None


# ---- max-pooling ---------------------------------------------------------------------------------
def max_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """F.max_pool2d(x, size, size) whose double backward (a gather at the saved indices) returns the
    gradient in x's memory format: torch's returns a contiguous one, and on channels-last activations
    every consumer then converts it back (two full-size copies per layer and step)."""
    return _MaxPool.apply(x, size)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        y, index = torch.ops.aten.max_pool2d_with_indices(x, [size] * 2, [size] * 2)
        ctx.save_for_backward(x, index)
        ctx.size = size
        return y

    @staticmethod
    def backward(ctx, gy):
        x, index = ctx.saved_tensors
        return _MaxPoolBackward.apply(gy, x, index, ctx.size), None


class _MaxPoolBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, index, size):
        ctx.save_for_backward(index)
        return torch.ops.aten.max_pool2d_with_indices_backward(_like(gy, x), x, [size] * 2, [size] * 2, [0, 0],
                                                                [1, 1], False, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        (index,) = ctx.saved_tensors
        n, c, h, w = index.shape
        if _channels_last(index):  # gather along H*W in the NHWC view: no copy, the result stays channels-last
            a = _like(a, index).permute(0, 2, 3, 1).reshape(n, -1, c)
            out = a.gather(1, index.permute(0, 2, 3, 1).reshape(n, h * w, c))
            return out.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None
        return a.contiguous().flatten(2).gather(2, index.flatten(2)).view(n, c, h, w), None, None, None
