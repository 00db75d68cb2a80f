"""top1: one accuracy loop for a torch module and for an onnxruntime session."""

import numpy as np
import pytest
import torch
from torch import nn

from slimdeploy.accuracy import top1
from slimdeploy.data import Normalize, Split
from slimdeploy.export import export_onnx
from slimdeploy.ortbench import OrtPredictor, SessionConfig

SHAPE = (3, 8, 8)
CLASSES = 5
IMAGES, RIGHT = 50, 30  # labels agree with the model on the first 30 of 50 images: exactly 60 %


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, CLASSES))
    net[1].running_mean.uniform_(-1, 1)  # running statistics far from a batch's: train mode predicts otherwise
    net[1].running_var.uniform_(0.2, 3)
    colours = torch.randint(0, 256, (IMAGES, 3, 1, 1))  # one colour per image, so predictions differ
    images = (colours + torch.randint(-20, 21, (IMAGES, *SHAPE))).clamp(0, 255).to(torch.uint8)
    normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")
    with torch.no_grad():
        logits = net.eval()(normalize(images))
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-ties that float rounding could flip
    labels = logits.argmax(1)
    labels[RIGHT:] = (labels[RIGHT:] + 1) % CLASSES
    path = export_onnx(net, tmp_path_factory.mktemp("accuracy") / "tiny.onnx", SHAPE)
    return net.train(), path, Split(images, labels), normalize


@pytest.mark.parametrize("batch", [16, 50, 64])  # a partial last batch, one exact batch, one short batch
def test_torch_and_onnxruntime_give_the_same_top1(case, batch):
    net, path, split, normalize = case
    expected = 100.0 * RIGHT / IMAGES
    assert top1(net, split, normalize, batch) == expected
    assert net.training and all(m.training for m in net.modules())  # every module's mode restored
    assert top1(OrtPredictor(path, SessionConfig(threads=1)), split, normalize, batch) == expected


def test_numpy_callables_get_contiguous_float_batches(case):
    net, path, split, _ = case
    channels_last = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu", channels_last=True)
    seen = []

    def predict(x: np.ndarray) -> np.ndarray:
        seen.append((x.dtype, x.flags.c_contiguous, x.shape))
        return OrtPredictor(path)(x)

    assert top1(predict, split, channels_last, 32) == 100.0 * RIGHT / IMAGES
    assert seen == [(np.float32, True, (32, *SHAPE)), (np.float32, True, (IMAGES - 32, *SHAPE))]


def test_bad_batch_is_refused(case):
    net, _, split, normalize = case
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        top1(net, split, normalize, 0)
