"""A head shared over feature levels: the classification analogue of RetinaNet's head
(Rethinking §5.2, Fig. 7, Table 5, Alg. 1).

RetinaNet applies one head — convolutions, each followed by BatchNorm — to the 5 levels of a
feature pyramid, so the head's normalization is trained on 5 domains at once. ``model.head=fpn``
builds the same structure on a classifier (:class:`FPNClassifier`):

* **levels**: the outputs ``C_s`` of the backbone stages ``s`` in ``model.fpn.levels`` (layer2–4
  by default), each projected to ``width`` channels by its own 1×1 lateral conv,
  ``P_s = lateral_s(C_s)``; with ``top_down`` (FPN, Lin et al. 2017) from the coarsest level
  down ``P_s = lateral_s(C_s) + nearest_upsample(P_{s+1})``. Off by default: with it every finer
  level holds the coarser ones, and on the CPU task the levels' statistics nearly coincide, so
  the head sees hardly distinct domains (RetinaNet's five levels are distinct ones);
* **the shared head**: the *same* ``convs`` × (3×3 conv → norm → ReLU) (4, as RetinaNet's),
  global average pool and linear classifier ``fc`` on every level, giving logits ``z_l``
  ``(N, K)`` per level ``l``;
* **training loss**: ``L = Σ_l CE(z_l, y)``, the levels' losses summed (RetinaNet sums its loss
  over the anchors of all levels), so one SGD step trains the head on all ``D`` levels;
* **prediction**: the mean of the level logits ``z̄ = (1/D) Σ_l z_l`` (its softmax is the
  renormalized geometric mean of the levels' softmax distributions). Every level votes, as every
  level's detections are kept by RetinaNet: a level whose normalization is broken at inference
  harms the prediction, as it harms the detector's AP.

The head's normalization (``model.fpn.norm``) is its own; the backbone keeps ``norm``:

* ``domain``: a :class:`~bnbench.norm.domain.DomainBatchNorm2d` after each conv with one domain
  per level (level ``l`` is domain ``l``), called through
  :meth:`~bnbench.norm.domain.DomainBatchNorm2d.forward_domains` with all levels at once, so
  the three choices of Table 5 apply as that layer documents them: SGD statistics
  (``train_stats``: per level, Fig. 7a, or shared over the joined levels, Fig. 7b), population
  statistics (``pop_stats``: one slot per level, or one shared slot) and the affine transform
  (``affine_mode``). EMA updates and PreciseBN
  (:func:`bnbench.population.update_population_stats`) fill the slots as the layer's docstring
  says; at inference level ``l`` is normalized with slot ``l`` (or the shared one). Its
  normalization batch is the process's batch (the paper's SyncBN over 16 images is one process
  of 16 here): the plan's ``nbs`` and SyncBN apply to the backbone's ``norm`` only;
* ``gn``: GroupNorm on each level (no batch statistics; Table 5's GN row), in groups of 8
  channels as in RetinaNet's head (256 channels, the GN paper's 32 groups);
* ``none``: no normalization, the convs have a bias (Table 5's "no norm" row).

Table 5's rows as ``model.fpn.{train_stats, pop_stats, affine_mode}``: 1 shared/shared/shared,
2 shared/domain/shared, 3 domain/shared/shared (Alg. 1 row 3, "the straightforward head"),
4 domain/domain/shared, 5 domain/shared/domain, 6 domain/domain/domain (Alg. 1 row 6). The
population choice never enters SGD, so rows 1–2, 3–4 and 5–6 train the same weights; they differ
in the statistics that inference uses.

The model owns its loss (:meth:`FPNClassifier.training_loss`, the trainer's hook
:func:`bnbench.train.training_loss`): in training mode ``forward`` returns the level logits
``(D, N, K)``; in eval mode the prediction ``(N, K)``, so evaluation needs nothing special.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench import norm as norms
from bnbench.errors import BnbenchError
from bnbench.norm.domain import DomainBatchNorm2d
from bnbench.norm.group import default_groups

if TYPE_CHECKING:
    from bnbench.models.resnet import ResNet

NormLayer = Callable[[int], nn.Module]


def normalize_levels(norm: nn.Module, levels: list[Tensor]) -> list[Tensor]:
    """The head's norm on every level: a :class:`DomainBatchNorm2d` takes them together (input
    ``l`` is domain ``l``), any other norm (GroupNorm, identity) each level alone."""
    if isinstance(norm, DomainBatchNorm2d):
        return norm.forward_domains(levels)
    return [norm(x) for x in levels]


class SharedHead(nn.Module):
    """``convs`` × (3×3 conv → norm → ReLU) with the same weights on every level; the norms
    see all levels at once (:func:`normalize_levels`). ``norm_layer=None``: no normalization,
    the convs have a bias."""

    def __init__(self, width: int, convs: int, norm_layer: NormLayer | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, 1, 1, bias=norm_layer is None)
                                   for _ in range(convs))
        self.norms = nn.ModuleList(nn.Identity() if norm_layer is None else norm_layer(width)
                                   for _ in range(convs))

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            levels = normalize_levels(norm, [conv(x) for x in levels])
            levels = [F.relu(x) for x in levels]
        return levels


class FPNClassifier(nn.Module):
    """A ResNet backbone, a feature pyramid over its ``levels`` stages and one
    :class:`SharedHead` with a shared classifier ``fc`` on every level (module docstring).

    Args:
        backbone: the ResNet (its ``fc`` is replaced by an identity: the classifier is ``fc``
            here, after the head).
        levels: backbone stages 1 … 4 (layer1 … layer4), increasing; level ``l`` of the head is
            ``levels[l]`` and domain ``l`` of its :class:`DomainBatchNorm2d` layers.
        width: channels of the laterals and the head.
        convs: conv–norm–ReLU blocks of the head.
        top_down: add the upsampled coarser level to each lateral (FPN).
        norm_layer: the head's norm factory, ``None`` for none; a :class:`DomainBatchNorm2d`
            must have one domain per level.
        num_classes: ``K``.
    """

    def __init__(self, backbone: ResNet, levels: Sequence[int], width: int, convs: int,
                 top_down: bool, norm_layer: NormLayer | None, num_classes: int) -> None:
        super().__init__()
        self.levels = tuple(levels)
        backbone.fc = nn.Identity()  # (torchvision's idiom for a backbone without classifier)
        self.backbone = backbone
        self.laterals = nn.ModuleList(nn.Conv2d(backbone.stage_channels[s - 1], width, 1)
                                      for s in self.levels)
        self.top_down = top_down
        self.head = SharedHead(width, convs, norm_layer)
        self.fc = nn.Linear(width, num_classes)
        for m in [*self.laterals, *self.head.convs]:
            if not m.weight.is_meta:  # (as the backbone: the meta device has no values)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._check_domains()

    def _check_domains(self) -> None:
        """The head's domain layers have one domain per level; the backbone's see one input per
        image (domain 0), so more domains there would never be trained."""
        d = len(self.levels)
        for layer in self.head.modules():
            if isinstance(layer, DomainBatchNorm2d) and layer.num_domains != d:
                raise BnbenchError(
                    f"model.fpn: the head's DomainBatchNorm2d has {layer.num_domains} domains "
                    f"for the {d} levels of model.fpn.levels={list(self.levels)} (one per level)")
        for layer in self.backbone.modules():
            if isinstance(layer, DomainBatchNorm2d) and layer.num_domains != 1:
                raise BnbenchError(
                    f"norm.num_domains={layer.num_domains}: with model.head=fpn the backbone "
                    f"normalizes each image once, in one domain; the {d} levels are domains of "
                    "the head alone (model.fpn.norm=domain gives it one per level)")

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """The levels ``P_l`` ``(N, width, H_l, W_l)``, finest first."""
        stages = self.backbone.forward_stages(x)
        levels = [lateral(stages[s - 1]) for lateral, s in zip(self.laterals, self.levels,
                                                               strict=True)]
        if self.top_down:
            for i in range(len(levels) - 2, -1, -1):
                coarser = F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
                levels[i] = levels[i] + coarser
        return levels

    def level_logits(self, x: Tensor) -> Tensor:
        """The logits of every level, ``(D, N, K)``."""
        features = self.head(self.pyramid(x))
        return torch.stack([self.fc(f.mean((2, 3))) for f in features])

    def forward(self, x: Tensor) -> Tensor:
        """Training: the level logits ``(D, N, K)`` (:meth:`training_loss` reads them);
        inference: the prediction, their mean ``(N, K)``."""
        logits = self.level_logits(x)
        return logits if self.training else logits.mean(0)

    @staticmethod
    def training_loss(output: Tensor, targets: Tensor,
                      label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(Σ_l CE(z_l, y), z̄)``: the summed cross-entropies of the level logits ``output``
        ``(D, N, K)`` and the prediction (their mean), whose top-1 the trainer counts."""
        loss = sum(F.cross_entropy(z, targets, label_smoothing=label_smoothing) for z in output)
        return loss, output.mean(0)


def head_norm(fpn: Any, num_levels: int) -> NormLayer | None:
    """The head's norm factory from ``model.fpn`` (values checked by
    :func:`bnbench.config.validate`), from the registry: ``domain`` with one domain per level,
    ``gn`` with groups of 8 channels (RetinaNet's 256 in 32: the GN paper's 32 groups at a
    narrow width would be one channel each, InstanceNorm); ``None`` for ``none``."""
    if fpn.norm == "none":
        return None
    if fpn.norm == "gn":
        groups = default_groups(fpn.width, preferred=max(1, fpn.width // 8))
        return norms.make("gn", groups=groups)
    return norms.make("domain", num_domains=num_levels, train_stats=fpn.train_stats,
                      pop_stats=fpn.pop_stats, affine_mode=fpn.affine_mode)


def fpn_classifier(backbone: ResNet, fpn: Any, num_classes: int) -> FPNClassifier:
    """:class:`FPNClassifier` on ``backbone`` (its norm swapped in already) from ``model.fpn``."""
    levels = list(fpn.levels)
    return FPNClassifier(backbone, levels, fpn.width, fpn.convs, fpn.top_down,
                         head_norm(fpn, len(levels)), num_classes)


__all__ = ["FPNClassifier", "SharedHead", "fpn_classifier", "head_norm", "normalize_levels"]
