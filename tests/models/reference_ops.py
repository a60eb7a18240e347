"""Direct, slow float64 computations of convolution blocks, shared by the heads' tests (not a test module)."""
from __future__ import annotations

import numpy as np
import torch


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def conv_ref(x: np.ndarray, w: np.ndarray, dilation: int = 1, bias: np.ndarray | None = None) -> np.ndarray:
    """A 'same' 2-D convolution, position by position: x (C, H, W), w (O, C, k, k), zero padding
    dilation * (k - 1) / 2 (float64)."""
    o, _, k, _ = w.shape
    pad = dilation * (k - 1) // 2
    _, hh, ww = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((o, hh, ww))
    for y in range(hh):
        for xx in range(ww):
            for i in range(k):
                for j in range(k):
                    out[:, y, xx] += w[:, :, i, j] @ xp[:, y + i * dilation, xx + j * dilation]
    return out if bias is None else out + bias[:, None, None]


def bn_relu_ref(y: np.ndarray, bn) -> np.ndarray:
    """Eval-mode BatchNorm, (y - mean) / sqrt(var + eps) * gamma + beta, then ReLU, channel by channel."""
    m, v = npy(bn.running_mean)[:, None, None], npy(bn.running_var)[:, None, None]
    g, b = npy(bn.weight)[:, None, None], npy(bn.bias)[:, None, None]
    return np.maximum((y - m) / np.sqrt(v + bn.eps) * g + b, 0.0)
