"""Top-1 accuracy of a model over an evaluation split, whichever backend runs it.

``predict`` is a torch module, or a callable from a float32 numpy batch to numpy logits, such as
`slimdeploy.ortbench.OrtPredictor` or a loaded runtime's ``run``:

    top1(model, data.test, normalize, 256)
    top1(OrtPredictor("pruned.onnx", SessionConfig(threads=2)), data.test, normalize, 256)
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from slimdeploy.data import FolderSplit, Normalize, Split, eval_batches
from slimdeploy.export import eval_mode
from slimdeploy.outputs import main_logits

NumpyPredict = Callable[[np.ndarray], np.ndarray]


def top1(predict: nn.Module | NumpyPredict, split: Split | FolderSplit, normalize: Normalize, batch: int,
         progress: bool = False) -> float:
    """Top-1 accuracy in percent over every image of ``split``, ``batch`` images at a time."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    torch_model = isinstance(predict, nn.Module)
    correct = 0
    batches = tqdm(eval_batches(split, batch), desc="eval", total=math.ceil(len(split) / batch),
                   disable=not progress, leave=False)
    mode = eval_mode(predict) if torch_model else contextlib.nullcontext()
    with mode, torch.no_grad():
        for images, labels in batches:
            x = normalize(images)
            logits = main_logits(predict(x)) if torch_model else _numpy_logits(predict, x)
            correct += int((logits.argmax(1).cpu() == labels).sum())
    return 100.0 * correct / max(len(split), 1)


def _numpy_logits(predict: NumpyPredict, x: torch.Tensor) -> torch.Tensor:
    # contiguous(): a channels_last batch would reach the runtime as a strided NCHW array
    return torch.from_numpy(np.asarray(predict(x.cpu().contiguous().numpy())))
