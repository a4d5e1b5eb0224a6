"""A head over crops of each image: the classification analogue of R-CNN's second stage
(Rethinking §4.2 and §6.1, Tables 3 and 6, Fig. 9).

An R-CNN head takes ``R_i`` regions of interest (RoIs) of every image ``i`` and makes a prediction
for each; its BatchNorm layers normalize the RoIs of all images of a GPU together, so with one or
two images per GPU a normalization batch holds highly correlated samples, whose statistics leak
information between them. ``model.head=crops`` builds the same structure on a classifier
(:class:`CropClassifier`):

1. **backbone**: a ResNet up to stage ``model.crops.stage`` (layer1 … layer4; the later stages
   are dropped), its feature map ``(N, C, H, W)``. Its normalization is
   ``model.crops.backbone_norm``, batch-independent (GN by default), as the paper's FrozenBN
   backbone is: the head is the only place where the batch matters;
2. **crops**: the same ``R`` boxes on every image (drawn once from ``model.crops.seed``,
   :func:`crop_boxes`), each resampled to ``s × s`` with one bilinear sample at the centre of each
   bin (:func:`crop_features`: RoIAlign with ``aligned=True`` and ``sampling_ratio=1``). The
   crops ``(N·R, C, s, s)`` are image-major: rows ``n·R … n·R + R − 1`` are image ``n``'s;
3. **head**: ``model.crops.layers`` × (3×3 conv → norm → ReLU) and a global average pool on each
   crop, then the classifier ``fc``: logits ``z_{n,r}`` per crop;
4. **training loss**: ``L = mean_{n,r} CE(z_{n,r}, y_n)`` — a crop's label is its image's, as an
   RoI's is its object's — through the trainer's hook :func:`bnbench.train.training_loss`;
5. **prediction**: per image, the mean of its crops' logits ``z̄_n = (1/R) Σ_r z_{n,r}`` (see
   :meth:`CropClassifier.forward` for why a mean).

The head's normalization is the run's ``norm``, its batches are the plan's
(:mod:`bnbench.plan`), and they count images, as everywhere else: a BN-family layer of the head
sees an image's ``R`` crops side by side as one sample ``(N, C, R·s, s)`` (:class:`CropNorm`), so
its per-channel statistics are those of the crops of the images in its normalization batch:

* per-device BN (``norm=ghost norm.nbs=k``): each simulated device's ``k`` contiguous images and
  their ``k·R`` crops (the paper's per-GPU BN with ``k`` img/GPU); with processes (``dist.nproc``)
  each process's images (``norm=bn``);
* ShuffleBN (``model.crops.shuffle=true``, Fig. 9): the crops permuted at random across all
  devices and processes before the head, and the predictions permuted back after it
  (:class:`bnbench.shuffle.ShuffleBN`), so a device normalizes a random subset of the crops;
* SyncBN (``norm=syncbn``): the crops of all devices together (one process: its whole batch);
* GN (``norm=gn``): each crop alone; ``model.crops.normalize=false``: no normalization.

At inference with population statistics (``bnbench eval stats=ema|precise``) every crop is
normalized alone; with mini-batch statistics (``stats=batch batch.nbs=1``) with those of its
image's ``R`` crops, the paper's "μ_B (1 img)" — legitimate here, since the crops of an image are
one input.

Where the analogue differs: an image of a classification dataset holds one object, and all its
crops share its label, while an R-CNN image's RoIs cover several objects and background. A
normalization batch of one image's crops therefore carries a single label, and normalizing it
removes the evidence its crops share; normalization batches of ``k ≥ 2`` images hold ``k``
labels, as a detector's per-GPU batch holds several objects.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench import norm as norms
from bnbench.shuffle import ShuffleBN

if TYPE_CHECKING:
    import torch.distributed as dist

    from bnbench.models.resnet import ResNet


def crop_boxes(num: int, min_side: float, max_side: float, seed: int) -> Tensor:
    """``num`` boxes ``(x1, y1, x2, y2)`` in map coordinates ``[0, 1]`` (``(num, 4)``, float32,
    CPU): each side uniform in ``[min_side, max_side]`` × the map's side, independently in x and
    y, the box placed uniformly inside the map. Drawn from a generator seeded ``seed``, not from
    the global RNG: the same boxes for every process and every build of the model."""
    gen = torch.Generator().manual_seed(seed)
    sides = min_side + (max_side - min_side) * torch.rand(num, 2, generator=gen, device="cpu")
    starts = (1 - sides) * torch.rand(num, 2, generator=gen, device="cpu")
    return torch.cat([starts, starts + sides], dim=1)


def crop_grid(boxes: Tensor, size: int) -> Tensor:
    """The sampling points of every box, ``(R·s, s, 2)`` as ``F.grid_sample`` reads them (x, y
    in ``[−1, 1]``, ``align_corners=False``: −1 and 1 are the map's outer edges): rows
    ``r·s … r·s + s − 1`` are box ``r``'s ``s × s`` bin centres
    ``x1 + (j + ½)(x2 − x1)/s`` (and the same in y)."""
    steps = (torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5) / size
    x = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # (R, s)
    y = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])
    r = boxes.shape[0]
    grid = torch.stack([x[:, None, :].expand(r, size, size), y[:, :, None].expand(r, size, size)],
                       dim=-1)
    return (2 * grid - 1).reshape(r * size, size, 2)


def crop_features(features: Tensor, boxes: Tensor, size: int) -> Tensor:
    """The crops of every image: ``(N, C, H, W)`` → ``(N·R, C, s, s)``, image-major.

    Each crop's bins are sampled once, bilinearly, at their centres: torchvision's
    ``roi_align(features, boxes · (W, H), s, aligned=True, sampling_ratio=1)`` with the same
    boxes on every image, from ``F.grid_sample`` (border padding: a sample within half a pixel
    of the edge takes the edge's value, as RoIAlign clamps it). One ``grid_sample`` call lays the
    ``R`` crops of an image side by side, the layout :class:`CropNorm` gives BN layers. The
    sampling points are float32 at least (bf16 autocast samples in float32 anyway)."""
    grid = crop_grid(boxes.to(torch.promote_types(features.dtype, torch.float32)), size)
    tiled = F.grid_sample(features, grid.expand(features.shape[0], -1, -1, -1),
                          mode="bilinear", padding_mode="border", align_corners=False)
    return images_to_crops(tiled, boxes.shape[0])


def crops_to_images(x: Tensor, crops: int) -> Tensor:
    """``(N·R, C, s, t)`` image-major crops → ``(N, C, R·s, t)``: each image's ``R`` crops side by
    side (along the height), one sample per image."""
    n, c, s, t = x.shape[0] // crops, x.shape[1], x.shape[2], x.shape[3]
    return x.view(n, crops, c, s, t).transpose(1, 2).reshape(n, c, crops * s, t)


def images_to_crops(x: Tensor, crops: int) -> Tensor:
    """The inverse of :func:`crops_to_images`: ``(N, C, R·s, t)`` → ``(N·R, C, s, t)``."""
    n, c, s, t = x.shape[0], x.shape[1], x.shape[2] // crops, x.shape[3]
    return x.view(n, c, crops, s, t).transpose(1, 2).reshape(n * crops, c, s, t)


class CropNorm(nn.Module):
    """A normalization layer of the crop head (``norm``, a child that
    :func:`bnbench.norm.convert` swaps like any other).

    A BN-family layer (``nn.BatchNorm2d``, which bnbench's layers subclass) normalizes the crops
    in image layout, :func:`crops_to_images`: a sample is an image's ``R`` crops, so BN's
    per-channel statistics over (samples, height, width) are those over the crops of the images
    of its normalization batch, and its ``nbs``, ``eval_nbs``, SyncBN and PreciseBN batches count
    images. Any other layer (GroupNorm) normalizes each crop on its own.
    """

    def __init__(self, norm: nn.Module, crops: int) -> None:
        super().__init__()
        self.norm = norm
        self.crops = crops

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, nn.BatchNorm2d):
            return images_to_crops(self.norm(crops_to_images(x, self.crops)), self.crops)
        return self.norm(x)


def crop_head(in_channels: int, channels: int, layers: int, crops: int,
              normalize: bool) -> nn.Sequential:
    """``layers`` × (3×3 conv → :class:`CropNorm` → ReLU), global average pool, flatten: a
    feature vector per crop. The norms are ``nn.BatchNorm2d`` placeholders for
    :func:`bnbench.norm.convert`; without ``normalize`` the convs have a bias instead."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, 1, 1,
                                 bias=not normalize))
        if normalize:
            modules.append(CropNorm(nn.BatchNorm2d(channels), crops))
        modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class CropClassifier(nn.Module):
    """A ResNet backbone up to stage ``stage``, ``R`` crops of its output per image and a head that
    classifies each (module docstring).

    Args:
        backbone: the ResNet, its normalization swapped in already; its stages after ``stage``
            and its ``fc`` become identities (every parameter then trains, as DDP requires).
        stage: the backbone stage (1 … 4) whose output is cropped.
        boxes: ``(R, 4)`` boxes in map coordinates (:func:`crop_boxes`), a buffer of the model
            (checkpoints carry them).
        size: each crop is ``size × size``.
        head: the per-crop part up to the feature vector (:func:`crop_head`), possibly wrapped
            in :class:`~bnbench.shuffle.ShuffleBN`.
        head_channels: the head's output width.
        num_classes: ``K``.
    """

    def __init__(self, backbone: ResNet, stage: int, boxes: Tensor, size: int, head: nn.Module,
                 head_channels: int, num_classes: int) -> None:
        super().__init__()
        for later in range(stage + 1, 5):
            setattr(backbone, f"layer{later}", nn.Identity())
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.stage = stage
        self.register_buffer("boxes", boxes)
        self.size = size
        self.head = head
        self.fc = nn.Linear(head_channels, num_classes)

    @property
    def num_crops(self) -> int:
        return self.boxes.shape[0]

    def crop_logits(self, x: Tensor) -> Tensor:
        """The logits of every crop, ``(N·R, K)``, image-major."""
        features = self.backbone.forward_stages(x)[self.stage - 1]
        return self.fc(self.head(crop_features(features, self.boxes, self.size)))

    def image_logits(self, crop_logits: Tensor) -> Tensor:
        """Each image's prediction ``(N, K)``: the mean of its crops' logits.

        A mean over the crops, not each crop scored on its own, so that every model of bnbench
        returns ``(N, K)`` logits at inference and one evaluation path serves all of them. It does
        not hide what Tables 3 and 6 measure: population statistics that do not fit a head trained
        on one image's crops shift the features of all crops of an image alike (those
        statistics are shared by the crops), which a mean over them does not undo."""
        return crop_logits.view(-1, self.num_crops, crop_logits.shape[1]).mean(1)

    def forward(self, x: Tensor) -> Tensor:
        """Training: the crop logits (:meth:`training_loss` reads them); inference: the images'
        predictions (:meth:`image_logits`)."""
        logits = self.crop_logits(x)
        return logits if self.training else self.image_logits(logits)

    def training_loss(self, output: Tensor, targets: Tensor,
                      label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(mean_{n,r} CE(z_{n,r}, y_n), z̄)``: the crops' cross-entropies with their images'
        labels, averaged over all crops, and the images' predictions (the trainer's top-1)."""
        loss = F.cross_entropy(output, targets.repeat_interleave(self.num_crops),
                               label_smoothing=label_smoothing)
        return loss, self.image_logits(output)


def _shuffle_group() -> dist.ProcessGroup | None:
    """ShuffleBN's process group: one of its own in a multi-process run (created by every rank
    as it builds the model; its collectives stay apart from DDP's), ``None`` in one process."""
    from bnbench import distributed as D

    if not D.is_distributed():
        return None
    return D.dist.new_group(timeout=timedelta(seconds=D.timeout_s()))


def crop_classifier(backbone: ResNet, crops: Any, norm_name: str, norm_options: dict[str, Any],
                    num_classes: int) -> CropClassifier:
    """:class:`CropClassifier` from ``model.crops`` (values checked by
    :func:`bnbench.config.validate`): the backbone (plain ``nn.BatchNorm2d`` layers) gets
    ``crops.backbone_norm`` with its default options, the head the run's ``norm_name`` with
    ``norm_options`` (the plan's batches included); with ``crops.shuffle`` the head runs under
    :class:`~bnbench.shuffle.ShuffleBN`, across the simulated devices of a process too."""
    norms.convert(backbone, crops.backbone_norm)
    stage_channels = backbone.stage_channels[crops.stage - 1]
    channels = crops.channels or stage_channels
    boxes = crop_boxes(crops.num, crops.min_side, crops.max_side, crops.seed)
    head: nn.Module = crop_head(stage_channels, channels, crops.layers, crops.num,
                                crops.normalize)
    for m in head.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # (as the backbone's convs)
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if crops.normalize:
        norms.convert(head, norm_name, **norm_options)
    if crops.shuffle:
        head = ShuffleBN(head, group=_shuffle_group(), within_process=True)
    return CropClassifier(backbone, crops.stage, boxes, crops.size, head, channels, num_classes)


__all__ = ["CropClassifier", "CropNorm", "crop_boxes", "crop_classifier", "crop_features",
           "crop_grid", "crop_head", "crops_to_images", "images_to_crops"]
