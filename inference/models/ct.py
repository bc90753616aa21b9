"""Cervical spine CT, two stages.

Stage 1, :class:`VertebraUNet3D`: a small 3-D U-Net that labels every voxel background or
C1..C7 (8 classes). Stage 2, :class:`FractureNet25D`: for each of the 7 vertebrae, a crop
around it (taken from the stage-1 mask) is read as a stack of thin slabs of 3 adjacent
axial slices (2.5-D); a 2-D CNN embeds every slab, a GRU over the slabs embeds the
vertebra, and a bidirectional GRU over the 7 vertebra embeddings gives one fracture
logit per vertebra and one for the patient, so a vertebra is judged with its neighbours
in view.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from spine_node.inference.models import register

SEGMENTATION_CLASSES = 8  # background + C1..C7
VERTEBRAE = 7


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


@register("cspine-ct-fracture-2.5d")
class FractureNet25D(nn.Module):
    """Per-vertebra fracture classifier over 2.5-D crops with a sequence model.

    Input ``(B, 7, D, H, W)``: one crop per vertebra C1..C7 (zeros where a vertebra was
    not found), ``D`` a multiple of ``group``. Output ``(B, 8)`` probabilities: C1..C7,
    then the patient (:meth:`logits` before the sigmoid).
    """

    def __init__(self, slices: int = 15, group: int = 3,
                 widths: tuple[int, ...] = (12, 24, 32, 48), hidden: int = 32) -> None:
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
        features = 2 * cin  # average and max pooling
        self.slab_gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.spine_gru = nn.GRU(4 * hidden, hidden, batch_first=True, bidirectional=True)
        self.vertebra_head = nn.Linear(4 * hidden + 2 * hidden, 1)
        self.patient_head = nn.Linear(2 * 2 * hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, 8)``: C1..C7 fractured, then the patient."""
        return torch.sigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 8)`` (training uses these with a logistic loss)."""
        batch, vertebrae, depth, height, width = x.shape
        slabs = depth // self.group
        images = x.reshape(-1, self.group, height, width)  # (B*V*S, group, H, W)
        f = self.cnn(images)
        f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        f = f.reshape(-1, slabs, f.shape[-1])  # (B*V, S, F)
        slab_out, _ = self.slab_gru(f)
        vertebra = torch.cat([slab_out.mean(dim=1), slab_out.amax(dim=1)], dim=1)
        vertebra = vertebra.reshape(-1, vertebrae, vertebra.shape[-1])  # (B, V, 4h)
        context, _ = self.spine_gru(vertebra)  # (B, V, 2h)
        per_vertebra = self.vertebra_head(torch.cat([vertebra, context], dim=2)).squeeze(2)
        patient = self.patient_head(torch.cat([context.mean(dim=1), context.amax(dim=1)], dim=1))
        return torch.cat([per_vertebra, patient], dim=1)
