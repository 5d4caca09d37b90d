"""An independent LIP for the tests: a softmax over unfolded windows.

It shares no code with lip_cuda: the output shape comes from torch's own
avg_pool2d, the windows from F.unfold over an input padded with -inf logits
(weight 0), and the stable softmax from torch.softmax.
"""
import math

import torch
import torch.nn.functional as F


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def window_softmax_lip(x, logit, kernel_size, stride, padding, ceil_mode=False):
    (kh, kw), (sh, sw), (ph, pw) = as_pair(kernel_size), as_pair(stride), as_pair(padding)
    n, c, h, w = x.shape
    oh, ow = F.avg_pool2d(
        torch.empty(1, 1, h, w), (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil_mode
    ).shape[-2:]
    # enough padding on the bottom/right for the last (ceil_mode) window
    pad_bottom = max((oh - 1) * sh + kh - ph - h, 0)
    pad_right = max((ow - 1) * sw + kw - pw - w, 0)
    pad = (pw, pad_right, ph, pad_bottom)
    logit_p = F.pad(logit, pad, value=-math.inf)
    x_p = F.pad(x, pad, value=0.0)
    lu = F.unfold(logit_p, (kh, kw), stride=(sh, sw))
    xu = F.unfold(x_p, (kh, kw), stride=(sh, sw))
    rows = (logit_p.shape[2] - kh) // sh + 1
    cols = (logit_p.shape[3] - kw) // sw + 1
    lu = lu.view(n, c, kh * kw, rows, cols)[..., :oh, :ow]
    xu = xu.view(n, c, kh * kw, rows, cols)[..., :oh, :ow]
    return (torch.softmax(lu, dim=2) * xu).sum(dim=2)


def oracle_with_grads(x, logit, grad_out, kernel_size, stride, padding, ceil_mode=False):
    """Forward and both gradients in float64."""
    x64 = x.detach().double().requires_grad_()
    l64 = logit.detach().double().requires_grad_()
    y = window_softmax_lip(x64, l64, kernel_size, stride, padding, ceil_mode)
    gx, gl = torch.autograd.grad(y, (x64, l64), grad_out.double())
    return y.detach(), gx, gl
