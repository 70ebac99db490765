"""A small Transformer encoder on padded variable-length sequences, for the lab's ``sequence`` experiment.

Each image (N, 1, H, W) is read as a sequence of its H rows of W pixels. :class:`RowSequences` crops
every sequence to a random length (a random run of consecutive rows, at least ``min_len``) and pads it
back to H with zeros, with a mask (N, H) of the real rows: variable-length sequences as a language model's
batch holds them. In training the crops are drawn afresh at every step (from torch's generator, seeded
by the run); in eval each image's crop is a fixed function of its pixels, so the test set is the same at
every evaluation.

:class:`SequenceClassifier`: rows → linear embedding + learned positions → ``depth`` post-norm encoder
layers (self-attention with the padding masked out of the keys, then a ReLU feed-forward; each
sub-layer's residual sum normalized as in Vaswani et al.) → mean over the real rows → linear classifier.
The normalization (``norm``):

* ``"ln"``: LayerNorm over the features of each position;
* ``"bn"``: BatchNorm over the features, statistics over every position of the batch, padding included
  (what BatchNorm1d on (N, C, L) does to a padded batch);
* ``"masked-bn"``: BatchNorm with statistics over the real positions only (:class:`normlab.nn.MaskedBatchNorm1d`);
* ``"renorm:warmup=W,rsteps=R,dsteps=D"``: batch renormalization over the real positions.
"""

from __future__ import annotations

import torch
from torch import nn

import normlab.nn as nnl
from normlab.lab.norms import parse

__all__ = ["RowSequences", "SeqNorm", "SequenceClassifier"]


class RowSequences(nn.Module):
    """Images (N, 1, H, W) → padded row sequences (N, H, W) and their mask (N, H); see the module docstring."""

    def __init__(self, min_len: int) -> None:
        super().__init__()
        self.min_len = min_len

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.flatten(1, -2) if x.dim() == 4 else x  # (N, H, W)
        n, h = rows.shape[0], rows.shape[1]
        span = h - self.min_len + 1
        if self.training:
            lengths = self.min_len + torch.randint(span, (n,), device=x.device)
            starts = (torch.rand(n, device=x.device) * (h - lengths + 1)).long()
        else:  # a fixed function of the image: the same crop at every evaluation
            code = (rows.abs().sum((1, 2)) * 1000).long()
            lengths = self.min_len + code % span
            starts = (code // span) % (h - lengths + 1)
        positions = torch.arange(h, device=x.device)
        mask = positions < lengths[:, None]
        source = (starts[:, None] + positions).clamp(max=h - 1)
        seq = torch.gather(rows, 1, source[:, :, None].expand(-1, -1, rows.shape[2]))
        return seq * mask[:, :, None], mask


class SeqNorm(nn.Module):
    """One of the normalizations of the module docstring, on (N, L, C) with the mask (N, L)."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        name, o = parse(kind)
        self.kind = name
        if name == "ln":
            self.norm = nnl.LayerNorm(channels)
        elif name == "bn":
            self.norm = nnl.BatchNorm1d(channels)
        elif name == "masked-bn":
            self.norm = nnl.MaskedBatchNorm1d(channels)
        elif name == "renorm":
            self.norm = nnl.BatchRenorm1d(channels, warmup_steps=o.get("warmup", 0), r_max_steps=o.get("rsteps", 0),
                                          d_max_steps=o.get("dsteps", 0))
        else:
            raise ValueError(f"unknown sequence norm {kind!r}; choose ln, bn, masked-bn or renorm")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln":
            return self.norm(x)
        if self.kind == "bn":
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        if self.kind == "masked-bn":
            return self.norm(x, mask=mask)
        y = torch.zeros_like(x)  # renorm over the real positions, gathered
        y[mask] = self.norm(x[mask])
        return y


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer: x = norm(x + attention(x)); x = norm(x + feed_forward(x))."""

    def __init__(self, width: int, heads: int, hidden: int, norm: str) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.norm1, self.norm2 = SeqNorm(norm, width), SeqNorm(norm, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, key_padding_mask=~mask, need_weights=False)
        x = self.norm1(x + attended, mask)
        return self.norm2(x + self.feed_forward(x), mask)


class SequenceClassifier(nn.Module):
    """Rows of an image as a padded sequence, classified by a small Transformer encoder (module docstring)."""

    def __init__(self, row_width: int, length: int, classes: int, width: int, depth: int, heads: int,
                 norm: str, min_len: int) -> None:
        super().__init__()
        self.sequences = RowSequences(min_len)
        self.embed = nn.Linear(row_width, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.layers = nn.ModuleList(EncoderLayer(width, heads, 2 * width, norm) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        seq, mask = self.sequences(images)
        x = self.embed(seq) + self.position
        for layer in self.layers:
            x = layer(x, mask)
        weights = mask[:, :, None].to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1)
        return self.head(pooled)
