"""The judge: a held-out attribute classifier that measures edits and never steers them.

An edit optimises the image until the classifier (models/classifier.py) reports the
target, so asking that same classifier whether the edit worked is circular. The judge
is a second classifier, named as `judge` in the models spec, that is never part of a
loss: "on target" by the judge is measured by a network the edit did not optimise.

Two file formats, told apart by the state dict's keys (a leading `module.` on every
key, as `nn.DataParallel` saves, is dropped first):

- `branched`: the classifier's own format (`conv_layers.*`, `fc_layers.*`, the CelebA
  mean and std buffers): a differently trained BranchedTiny, run exactly as the
  classifier runs (it resizes and normalises inside).
- `resnet50`: a torchvision ResNet-50 state dict (`torchvision.models.resnet50(
  num_classes=40)`: `conv1.weight`, `bn1.*`, `layer1.*` to `layer4.*`, `fc.weight`
  [40, 2048], `fc.bias` [40]) whose 40 outputs are the CelebA attributes in the order
  of CelebA's own attribute file (`list_attr_celeba.txt`: `5_o_Clock_Shadow`,
  `Arched_Eyebrows`, ...; models/celeba.py CELEBA_FILE_ORDER). Its images are
  area-resized to 224x224 and normalised with ImageNet's mean (0.485, 0.456, 0.406) and
  std (0.229, 0.224, 0.225). That is how public CelebA ResNet-50 attribute classifiers
  are commonly trained, but not all of them: check that yours was (and that its outputs
  are in this order) before trusting what it says.

Either way the judge takes images [N, 3, H, W] in [0, 1] of any size and returns the
40 logits [N, 40] in the classifier's order (models/celeba.py ATTRIBUTES): a
`resnet50` judge's outputs are reordered into it. This module builds architectures; models/loaders.py `load_judge`
reads the file.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models import resnet50

from .celeba import ATTRIBUTES, CELEBA_FILE_ORDER
from .classifier import BranchedTiny

JUDGE_FORMATS = ("branched", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
RESNET50_FEATURES = 2048
DATA_PARALLEL_PREFIX = "module."
# column k of the classifier's order is output FROM_FILE_ORDER[k] of a resnet50 judge
FROM_FILE_ORDER = [CELEBA_FILE_ORDER.index(name) for name in ATTRIBUTES]


class Judge(nn.Module):
    """A held-out attribute classifier: images [N, 3, H, W] in [0, 1] -> logits [N, 40].

    `network` holds exactly the file's keys; `format` is one of JUDGE_FORMATS. For
    `resnet50` this module does the resizing and ImageNet normalisation the bare
    torchvision network lacks; a `branched` network does its own.
    """

    def __init__(self, network: nn.Module, format: str):
        super().__init__()
        if format not in JUDGE_FORMATS:
            raise ValueError(f"judge format must be one of {', '.join(JUDGE_FORMATS)}, "
                             f"got {format!r}")
        self.format = format
        self.network = network
        # not in the state dict: the file holds only the network's own keys
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.format == "resnet50":
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
            images = (images - self.imagenet_mean) / self.imagenet_std
            return self.network(images)[:, FROM_FILE_ORDER]
        return self.network(images)


def strip_data_parallel(state_dict: Mapping) -> dict:
    """The state dict without `module.` when every key starts with it (a DataParallel
    save); otherwise unchanged."""
    keys = [str(k) for k in state_dict]
    if keys and all(k.startswith(DATA_PARALLEL_PREFIX) for k in keys):
        return {str(k).removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state_dict.items()}
    return dict(state_dict)


def judge_format(state_dict: Mapping) -> str:
    """Which of JUDGE_FORMATS the keys are; ValueError saying what was found otherwise."""
    if "conv_layers.01-06.0.0.weight" in state_dict:
        return "branched"
    if "conv1.weight" in state_dict and "fc.weight" in state_dict:
        return "resnet50"
    found = sorted(map(str, state_dict))[:5]
    raise ValueError("not a judge: the keys are neither BranchedTiny's (conv_layers.*, "
                     "fc_layers.*) nor a torchvision ResNet-50's (conv1.*, ..., fc.*); "
                     f"found {found}")


def build_judge(state_dict: Mapping) -> Judge:
    """An untrained Judge whose `network` fits `state_dict`'s format and widths; the
    caller loads the weights. ValueError when the dict is no judge."""
    fmt = judge_format(state_dict)
    if fmt == "branched":
        return Judge(BranchedTiny(**BranchedTiny.config_from_state_dict(state_dict)), fmt)
    fc = state_dict["fc.weight"]
    want = (len(ATTRIBUTES), RESNET50_FEATURES)
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) != want:
        shape = list(fc.shape) if isinstance(fc, torch.Tensor) else type(fc).__name__
        raise ValueError(f"fc.weight is {shape}, but a ResNet-50 judge has {list(want)}: "
                         f"{len(ATTRIBUTES)} outputs, the CelebA attributes in the order "
                         "of CelebA's list_attr_celeba.txt")
    return Judge(resnet50(num_classes=len(ATTRIBUTES)), fmt)
