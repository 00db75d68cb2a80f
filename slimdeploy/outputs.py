"""Model outputs with auxiliary heads: torchvision GoogLeNet and Inception v3 return a namedtuple
(logits, aux logits...) in train mode and plain logits in eval mode."""

from __future__ import annotations

import torch
from torch import nn

# The attributes torchvision's GoogLeNet and Inception3 keep their auxiliary classifiers in.
AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def main_logits(output) -> torch.Tensor:
    """The logits to train on: the tensor itself, a namedtuple's ``logits``, or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output is a {type(output).__name__}; expected logits: a tensor, a namedtuple "
                        f"with .logits, or a tuple whose first element is the logits")
    return logits


def aux_heads(model: nn.Module) -> list[str]:
    """Names of the model's auxiliary classifiers (attributes of the model itself)."""
    if not getattr(model, "aux_logits", False):
        return []
    return [name for name in AUX_HEADS if isinstance(getattr(model, name, None), nn.Module)]


def drop_aux_heads(model: nn.Module) -> list[str]:
    """Remove torchvision's auxiliary classifiers in place, as its builders do for ``aux_logits=False``;
    return the names removed.

    They run in train mode only, so the eval-mode dependency graph never sees them: pruning the
    channels they read would leave them the wrong width.
    """
    dropped = aux_heads(model)
    for name in dropped:
        setattr(model, name, None)
    if dropped:
        model.aux_logits = False
    return dropped
