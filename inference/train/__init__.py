"""Training recipes, one per model family, run as ``spine-node train <family>``.

Every recipe trains with fixed seeds on the synthetic phantoms by default (or on the
real public dataset layout its family came from, given ``--data``), exports ONNX and
writes model cards into the model repository (``engines/``).

The registry is torch-free: it names each recipe's module and help text, and the module
(which imports torch) is imported only when the recipe runs. A family adds itself with
one entry in :data:`RECIPES`; its module defines ``run(options: TrainOptions) -> dict``
(or the function the entry names, when one module holds several recipes).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_node.engines import ENGINES_DIR


@dataclass(frozen=True)
class Recipe:
    """A training recipe: family name, the module that runs it, one line of help."""

    family: str
    module: str
    help: str
    function: str = "run"


@dataclass(frozen=True)
class TrainOptions:
    """Options every recipe understands (``spine-node train <family> --help``).

    ``epochs`` None means the recipe's default; ``data`` None means phantoms. ``quick``
    shrinks everything for smoke tests (the weights are then not worth shipping).
    """

    data: Path | None = None
    epochs: int | None = None
    out: Path = ENGINES_DIR
    seed: int = 0
    threads: int = 2
    progress: bool = True
    quick: bool = False
    #: "default" (sized for 2 CPU cores) or "gpu" (more data and steps for a CUDA GPU)
    budget: str = "default"
    #: Fine-tuning: a model repository whose model.pt weights the training starts from.
    init: Path | None = None
    #: Re-run validation on the models in ``out`` and rewrite the operating points in
    #: their cards, without training (recipes that support it: ct-cspine and the X-ray
    #: classifiers).
    validate_only: bool = False
    #: "all", or one stage of a multi-stage recipe to train alone, the others kept as they
    #: are in ``out`` (recipes that support it: ct-cspine, stage "fracture").
    stage: str = "all"
    #: Instead of training stage 2, average the weights (model.pt) of these model
    #: repositories, fine-tunes of one model ("model soup"; ct-cspine ``--stage fracture``).
    average: tuple[Path, ...] = ()


RECIPES: dict[str, Recipe] = {
    recipe.family: recipe
    for recipe in (
        Recipe("ct-cspine", "spine_node.inference.train.ct",
               "Cervical spine CT: C1-C7 3-D segmentation + per-vertebra fracture classifier "
               "(phantoms, or the RSNA 2022 Cervical Spine Fracture Detection layout)."),
        *(Recipe(family, "spine_node.inference.train.xray", text, function)
          for family, text, function in (
              ("xray", "All six spine X-ray demo models on phantom radiographs (DRRs).",
               "run_all"),
              ("xray-pair-classifier", "Spine X-ray AP + LAT pair classifier, damaged / "
               "normal (or a folder-per-class layout of study folders).", "run_pair"),
              ("xray-fracture-mobilenet", "Spine X-ray MobileNet fracture / normal "
               "classifier (or a folder-per-class layout).", "run_fracture"),
              ("xray-cspine-classifier", "Cervical spine X-ray normal / fracture / "
               "dislocation classifier with saliency (or a folder-per-class layout).",
               "run_cspine"),
              ("xray-spine-unet-ap", "Spine X-ray AP U-Net segmentation (or images/ + "
               "masks/ layout).", "run_unet_ap"),
              ("xray-spine-unet-lat", "Spine X-ray LAT U-Net segmentation (or images/ + "
               "masks/ layout).", "run_unet_lat"),
              ("xray-tissue-xnet", "X-ray tissue segmentation bone / soft tissue / open "
               "beam, XNet (or images/ + masks/ layout).", "run_tissue"),
          )),
    )
}


def recipe(family: str) -> Recipe:
    try:
        return RECIPES[family]
    except KeyError:
        known = ", ".join(sorted(RECIPES)) or "none"
        raise KeyError(f"unknown training recipe {family!r}; known: {known}") from None


def run(family: str, options: TrainOptions) -> dict[str, Any]:
    """Run the recipe for ``family``; returns its summary (paths written, metrics)."""
    entry = recipe(family)
    module = importlib.import_module(entry.module)
    summary: dict[str, Any] = getattr(module, entry.function)(options)
    return summary


def mean_weights(states: Sequence[Mapping[str, Any]], sources: Sequence[object]) -> dict[str, Any]:
    """The element-wise mean of the state dicts ``states`` (``--average``: a "model soup"
    of fine-tunes of one model); integer buffers (BatchNorm's batch counter) are taken from
    the first. ``sources`` name them in the error when one has another architecture."""
    import torch

    if len(states) < 2:
        raise ValueError("averaging needs at least two model repositories")
    keys = set(states[0])
    for source, state in zip(sources, states, strict=True):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"{source}: another architecture than {sources[0]}")
    return {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                if v.is_floating_point() else v) for k, v in states[0].items()}
