"""The six spine X-ray model families (and the view gate) (torch), small enough to run on a CPU.

Every model takes single-channel radiographs ``(N, 1, H, W)`` normalised to [0, 1] (see
:func:`spine_node.inference.pipelines.xray.prepare_radiograph`) and returns what the exported ONNX
graph returns, so the pipelines need no post-processing beyond thresholds:

=========================  ==================================  ==============================
family                     inputs                              outputs
=========================  ==================================  ==============================
:class:`PairClassifier`    ``ap``, ``lat``                     ``probabilities`` (N, 2)
:class:`FractureMobileNet` ``image``                           ``probabilities`` (N, 2)
:class:`CSpineCAMNet`      ``image``                           ``probabilities`` (N, 3),
                                                               ``saliency`` (N, 1, H, W)
:class:`UNet2D`            ``image``                           ``probabilities`` (N, 1+K, H, W)
:class:`XNet`              ``image``                           ``probabilities`` (N, K, H, W)
:class:`ViewGate`          ``image``                           ``probabilities`` (N, 3)
=========================  ==================================  ==============================

During training call :meth:`logits` (the raw scores a loss wants); ``forward`` is the
exported inference graph (softmax applied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spine_node.inference.models import register


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers, the U-Net building block."""
    return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))


class _Encoder(nn.Module):
    """Plain strided CNN: ``widths[i]`` channels after the i-th halving."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in widths:
            layers += [conv_bn_relu(cin, width, stride=2), conv_bn_relu(width, width)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _map_scores(maps: torch.Tensor) -> torch.Tensor:
    """Class scores from class maps: mean + max pooled, so one abnormal level counts."""
    return 0.5 * (maps.mean(dim=(2, 3)) + maps.amax(dim=(2, 3)))


@register("xray-pair-classifier")
class PairClassifier(nn.Module):
    """Damaged / normal spine from the AP and the LAT view of one study.

    Two separate CNN branches (AP and LAT anatomy differ). Each ends in a 1x1 conv giving
    per-class evidence maps (stride 8); the study's class scores are the sum of both
    views' pooled maps, so either view can carry the finding. In training the "damage"
    maps are also supervised with where the damaged vertebrae project. Class 0 normal,
    1 damage.
    """

    input_names = ("ap", "lat")
    output_names = ("probabilities",)

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48), num_classes: int = 2) -> None:
        super().__init__()
        self.ap_branch = _Encoder(widths)
        self.lat_branch = _Encoder(widths)
        self.ap_maps = nn.Conv2d(widths[-1], num_classes, 1)
        self.lat_maps = nn.Conv2d(widths[-1], num_classes, 1)

    def training_outputs(self, ap: torch.Tensor, lat: torch.Tensor
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Class logits and the per-view damage-map logits (stride 8)."""
        ap_maps = self.ap_maps(self.ap_branch(ap))
        lat_maps = self.lat_maps(self.lat_branch(lat))
        return _map_scores(ap_maps) + _map_scores(lat_maps), (ap_maps[:, 1:], lat_maps[:, 1:])

    def logits(self, ap: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        return self.training_outputs(ap, lat)[0]

    def forward(self, ap: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(ap, lat), dim=1)


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv then 1x1 pointwise conv, each BN + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@register("xray-fracture-mobilenet")
class FractureMobileNet(nn.Module):
    """MobileNet-style fracture / normal classifier (depthwise-separable convolutions).

    Class 0 normal, 1 fracture. The classifier is a 1x1 conv giving class evidence maps
    on the last features (stride 8), pooled to scores; in training the fracture map is
    also supervised with where the fractured vertebrae project.
    """

    input_names = ("image",)
    output_names = ("probabilities",)

    #: (output channels, stride) of each depthwise-separable block after the stem.
    BLOCKS: tuple[tuple[int, int], ...] = ((32, 1), (48, 2), (48, 1), (96, 2), (96, 1),
                                           (128, 1), (128, 1))

    def __init__(self, stem: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(1, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True))]
        cin = stem
        for cout, stride in self.BLOCKS:
            layers.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def training_outputs(self, image: torch.Tensor
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        maps = self.classifier(self.dropout(self.features(image)))
        return _map_scores(maps), (maps[:, 1:],)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.training_outputs(image)[0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


@register("xray-cspine-classifier")
class CSpineCAMNet(nn.Module):
    """Cervical spine normal / fracture / dislocation with a class-activation saliency map.

    The classifier is a 1x1 convolution over the last feature map (stride 8), so it
    yields one class activation map (CAM, Zhou et al. 2016) per class; a class score is
    the pooled CAM (mean + max, so one abnormal level is not averaged away). In training
    the abnormal CAMs are also supervised with where the fractured / dislocated vertebrae
    project. The exported graph returns the probabilities and the saliency: the CAMs of
    the abnormal classes weighted by their probabilities, rectified, upsampled to the
    input size and scaled to [0, 1] per image. Classes: 0 normal, 1 fracture,
    2 dislocation.
    """

    input_names = ("image",)
    output_names = ("probabilities", "saliency")

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = _Encoder(widths)
        self.context = conv_bn_relu(self.encoder.out_channels, self.encoder.out_channels)
        self.dropout = nn.Dropout2d(0.1)
        self.cam_head = nn.Conv2d(self.encoder.out_channels, num_classes, 1)

    def class_maps(self, image: torch.Tensor) -> torch.Tensor:
        """Class activation maps ``(N, classes, h, w)`` at feature resolution."""
        return self.cam_head(self.dropout(self.context(self.encoder(image))))

    def training_outputs(self, image: torch.Tensor
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        cams = self.class_maps(image)
        return _map_scores(cams), (cams[:, 1:],)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return _map_scores(self.class_maps(image))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.class_maps(image)
        probabilities = torch.softmax(_map_scores(cams), dim=1)
        abnormal = probabilities[:, 1:, None, None] * cams[:, 1:]
        saliency = F.relu(abnormal.sum(dim=1, keepdim=True))
        saliency = F.interpolate(saliency, size=image.shape[2:], mode="bilinear",
                                 align_corners=False)
        peak = saliency.amax(dim=(2, 3), keepdim=True)
        return probabilities, saliency / (peak + 1e-6)


@register("xray-spine-unet")
class UNet2D(nn.Module):
    """2D U-Net (Ronneberger et al. 2015), small; softmax over background + structures.

    Channel 0 is background, channel k the k-th structure; where structures overlap in
    a projection the ground truth keeps the one painted last, so one class per pixel.
    """

    input_names = ("image",)
    output_names = ("probabilities",)

    def __init__(self, num_classes: int, base: int = 12, depth: int = 3) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(1, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(double_conv(2 * widths[i], widths[i])
                                   for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


@register("xray-tissue-xnet")
class XNet(nn.Module):
    """XNet-style tissue segmenter (Bullock et al. 2019): two encoder-decoder passes.

    The "X" shape goes down, up, down again and up, with skip connections across each
    half; it was designed for small X-ray datasets. Softmax over tissue classes (every
    pixel is bone, soft tissue or open beam).
    """

    input_names = ("image",)
    output_names = ("probabilities",)

    def __init__(self, num_classes: int = 3, base: int = 12) -> None:
        super().__init__()
        c1, c2, c3 = base, 2 * base, 4 * base
        self.enc1 = double_conv(1, c1)
        self.enc2 = double_conv(c1, c2)
        self.bottom1 = double_conv(c2, c3)
        self.up1 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec1 = double_conv(2 * c2, c2)
        self.bottom2 = double_conv(c2, c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = double_conv(2 * c2, c2)
        self.up3 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec3 = double_conv(2 * c1, c1)
        self.out = nn.Conv2d(c1, num_classes, 1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(image)                       # H
        e2 = self.enc2(F.max_pool2d(e1, 2))         # H/2
        b1 = self.bottom1(F.max_pool2d(e2, 2))      # H/4
        d1 = self.dec1(torch.cat([self.up1(b1), e2], dim=1))   # H/2
        b2 = self.bottom2(F.max_pool2d(d1, 2))      # H/4
        d2 = self.dec2(torch.cat([self.up2(b2), d1], dim=1))   # H/2
        d3 = self.dec3(torch.cat([self.up3(d2), e1], dim=1))   # H
        return self.out(d3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


@register("xray-view-gate")
class ViewGate(nn.Module):
    """Is this a spine radiograph, and which view: not-spine / AP / LAT.

    A small strided CNN over the 2 mm model window with mean + max pooling, so a spine
    anywhere in the window counts; the pipelines run it before any other X-ray model and
    only pass an image on to the models trained for its view. Classes: 0 other (not a
    spine radiograph), 1 AP, 2 LAT.
    """

    input_names = ("image",)
    output_names = ("probabilities",)

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48), num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = _Encoder(widths)
        self.head = nn.Linear(2 * self.encoder.out_channels, num_classes)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        features = self.encoder(image)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)

    def training_outputs(self, image: torch.Tensor
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self.logits(image), ()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)
