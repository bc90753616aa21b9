"""Cervical spine CT, two stages.

Stage 1, :class:`VertebraUNet3D`: a small 3-D U-Net whose output channels are the classes
background / C1 / C2 / C3-C7 / thoracolumbar vertebra and a heat map at each vertebral
body (the pipeline numbers the levels from anatomy). Stage 2,
:class:`VertebraFractureNet`: each vertebra's crop read as a stack of thin slabs of 3
adjacent axial slices (2.5-D); a 2-D CNN embeds every slab, a GRU over the slabs gives
one fracture logit per vertebra, each vertebra on its own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from spine_node.inference.models import register

SEGMENTATION_CLASSES = 6  # background, C1, C2, C3-C7, thoracolumbar + the body heat map


def _conv3d(cin: int, cout: int, kernel: int = 3, norm: bool = True) -> nn.Sequential:
    # Full-resolution layers go without normalisation: batch norm there costs more CPU
    # time than the convolutions.
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=not norm),
        nn.BatchNorm3d(cout) if norm else nn.Identity(),
        nn.LeakyReLU(0.1, inplace=True),
    )


@register("cspine-ct-unet3d")
class VertebraUNet3D(nn.Module):
    """3-D U-Net: ``(B, 1, D, H, W)`` normalised CT -> ``(B, classes, D, H, W)`` logits.

    Which vertebra a voxel belongs to is a question of context, whether it is bone at all
    a question of local intensity. So the U-Net proper runs at half resolution and a
    light full-resolution path (a 3x3x3 stem and 1x1x1 layers) restores the detail: this
    keeps training on a CPU to minutes. ``D``, ``H`` and ``W`` must be multiples of
    ``2 ** len(widths)``.
    """

    def __init__(self, in_channels: int = 1, classes: int = SEGMENTATION_CLASSES,
                 widths: tuple[int, ...] = (16, 32, 64), stem: int = 6) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.stem = _conv3d(in_channels, stem, norm=False)
        self.encoders = nn.ModuleList()
        cin = in_channels + stem
        for width in widths:
            self.encoders.append(nn.Sequential(_conv3d(cin, width), _conv3d(width, width)))
            cin = width
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose3d(widths[i], widths[i - 1], 2, stride=2))
            self.decoders.append(_conv3d(2 * widths[i - 1], widths[i - 1]))
        self.up_full = nn.ConvTranspose3d(widths[0], widths[0] // 2, 2, stride=2)
        self.full = nn.Sequential(_conv3d(widths[0] // 2 + stem + in_channels, 16, 1, norm=False),
                                  nn.Conv3d(16, classes, 1))

    @property
    def multiple(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = torch.cat([x, self.stem(x)], dim=1)
        h = F.avg_pool3d(stem, 2)
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i:
                h = F.max_pool3d(h, 2)
            h = encoder(h)
            skips.append(h)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            h = decoder(torch.cat([up(h), skip], dim=1))
        return self.full(torch.cat([self.up_full(h), stem], dim=1))


def _conv2d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@register("cspine-ct-vertebra-classifier-2.5d")
class VertebraFractureNet(nn.Module):
    """Fracture probability for each vertebra crop, one crop at a time.

    Input ``(B, V, D, H, W)``: ``V`` crops (any number: the vertebrae that were found),
    each classified on its own, so a missing or unlabelled neighbour never changes
    another vertebra's answer. A 2-D CNN reads slabs of ``group`` slices, a bidirectional
    GRU runs over the slabs. Output ``(B, V)`` probabilities (:meth:`logits` before the
    sigmoid). The patient-level answer is derived from the vertebrae, not learned.
    """

    def __init__(self, slices: int = 24, group: int = 3,
                 widths: tuple[int, ...] = (16, 32, 48, 64), hidden: int = 48) -> None:
        super().__init__()
        if slices % group:
            raise ValueError(f"slices ({slices}) must be a multiple of group ({group})")
        self.slices, self.group = slices, group
        layers: list[nn.Module] = [_conv2d(group, widths[0])]
        cin = widths[0]
        for width in widths[1:]:
            layers += [_conv2d(cin, width, stride=2), _conv2d(width, width)]
            cin = width
        self.cnn = nn.Sequential(*layers)
        self.slab_gru = nn.GRU(2 * cin, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(4 * hidden, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        batch, vertebrae, depth, height, width = x.shape
        slabs = depth // self.group
        f = self.cnn(x.reshape(-1, self.group, height, width))
        f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        out, _ = self.slab_gru(f.reshape(-1, slabs, f.shape[-1]))
        pooled = torch.cat([out.mean(dim=1), out.amax(dim=1)], dim=1)
        return self.head(pooled).reshape(batch, vertebrae)
