"""ExecuTorch programs (.pte) with the XNNPACK CPU delegate, exported from the PyTorch model.

ExecuTorch does not read ONNX: its program is lowered from ``torch.export`` of the model itself. Needs
the ``executorch`` extra (``pip install -e .[executorch]``); it is imported only when a program is built.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from slimdeploy.export import ExportError, atomic_path, eval_mode, first_line


def pte_path(onnx_path) -> Path:
    """Where the program of an exported model goes: beside its ONNX file (dense.onnx -> dense.pte)."""
    return Path(onnx_path).with_suffix(".pte")


def export_pte(model: nn.Module, path, input_shape: tuple[int, int, int], max_batch: int) -> Path:
    """Lower `model` (C, H, W input) to an ExecuTorch program for XNNPACK taking any batch from 1 to
    `max_batch`; its buffers are planned for `max_batch`. Returns the path; a model that cannot be
    exported or lowered raises `ExportError` in one line."""
    return _export_program(model, path, input_shape, max_batch)


def export_pte_int8(model: nn.Module, path, input_shape: tuple[int, int, int], max_batch: int,
                    calibration: torch.Tensor) -> Path:
    """`export_pte` with static INT8 by XNNPACK's quantizer: weights symmetric per output channel,
    activations per tensor, their ranges calibrated on `calibration` (N, C, H, W, float, normalised as
    the model's inputs). Operators XNNPACK cannot quantize stay in float32."""
    if not (torch.is_floating_point(calibration) and tuple(calibration.shape[1:]) == tuple(input_shape)
            and len(calibration) > 0):
        raise ValueError(f"calibration must be a float tensor of shape (N, {', '.join(map(str, input_shape))})"
                         f" with N >= 1, got {calibration.dtype} {tuple(calibration.shape)}")
    quantize = functools.partial(_quantize_int8, calibration=calibration.cpu(), max_batch=max_batch)
    return _export_program(model, path, input_shape, max_batch, quantize)


def _export_program(model: nn.Module, path, input_shape: tuple[int, int, int], max_batch: int,
                    quantize=None) -> Path:
    """`export_pte`, with `quantize` (exported module -> quantized module) applied before lowering."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path, shape = Path(path), "x".join(str(n) for n in input_shape)
    kind = "ExecuTorch INT8 export" if quantize else "ExecuTorch export"
    # XNNPACK's layout passes expect the default memory format: a channels_last model (as trained on
    # CPU) fails in ChannelsLastTaggedReshapePass, so the program is lowered from a contiguous copy.
    cpu_model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))  # export needs max > min
    example, dynamic_shapes = (torch.randn(2, *input_shape),), ({0: batch},)
    with eval_mode(cpu_model), atomic_path(path) as tmp:
        try:
            exported = torch.export.export(cpu_model, example, dynamic_shapes=dynamic_shapes)
            if quantize is not None:
                quantized = quantize(exported.module())
                exported = torch.export.export(quantized, example, dynamic_shapes=dynamic_shapes)
            # Lowering runs the convolutions on fake tensors, whose backend choice otherwise guards
            # the batch below 16 (torch 2.14); size-oblivious symbols keep the exported batch range.
            with fx_config.patch(backed_size_oblivious=True):
                program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        except Exception as err:  # torch.export, quantization and the lowering passes raise many types
            raise ExportError(f"{type(model).__name__} (input {shape}) -> {path.name}: {kind} "
                              f"failed: {first_line(err)}") from err
        planned = _planned_batch(program)
        if planned < max_batch:
            raise ExportError(f"{path.name}: the ExecuTorch program takes batches up to {planned}, "
                              f"not the {max_batch} asked for")
        tmp.write_bytes(program.buffer)
    return path


def _quantize_int8(graph: nn.Module, calibration: torch.Tensor, max_batch: int) -> nn.Module:
    """The exported `graph` with INT8 quantize/dequantize pairs XNNPACK fuses into quantized operators,
    calibrated on `calibration` in batches the exported batch range admits."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration.float().split(max(max_batch, 2)):
            observed(chunk.contiguous())
    return convert_pt2e(observed)


def _planned_batch(program) -> int:
    """The largest batch the program's memory plan holds for its input."""
    graph = program.exported_program()
    user_input = graph.graph_signature.user_inputs[0]
    node = next(n for n in graph.graph_module.graph.nodes if n.op == "placeholder" and n.name == user_input)
    return int(node.meta["spec"].shape[0])
