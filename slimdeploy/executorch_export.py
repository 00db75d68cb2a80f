"""ExecuTorch programs (.pte) with the XNNPACK CPU delegate, exported from the PyTorch model.

ExecuTorch does not read ONNX: its program is lowered from ``torch.export`` of the model itself. Needs
the ``executorch`` extra (``pip install -e .[executorch]``); it is imported only when a program is built.
"""

from __future__ import annotations

import copy
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
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path, shape = Path(path), "x".join(str(n) for n in input_shape)
    # XNNPACK's layout passes expect the default memory format: a channels_last model (as trained on
    # CPU) fails in ChannelsLastTaggedReshapePass, so the program is lowered from a contiguous copy.
    cpu_model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))  # export needs max > min
    with eval_mode(cpu_model), atomic_path(path) as tmp:
        try:
            exported = torch.export.export(cpu_model, (torch.randn(2, *input_shape),),
                                           dynamic_shapes=({0: batch},))
            # Lowering runs the convolutions on fake tensors, whose backend choice otherwise guards
            # the batch below 16 (torch 2.14); size-oblivious symbols keep the exported batch range.
            with fx_config.patch(backed_size_oblivious=True):
                program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        except Exception as err:  # torch.export and the lowering passes raise many unrelated types
            raise ExportError(f"{type(model).__name__} (input {shape}) -> {path.name}: ExecuTorch export "
                              f"failed: {first_line(err)}") from err
        planned = _planned_batch(program)
        if planned < max_batch:
            raise ExportError(f"{path.name}: the ExecuTorch program takes batches up to {planned}, "
                              f"not the {max_batch} asked for")
        tmp.write_bytes(program.buffer)
    return path


def _planned_batch(program) -> int:
    """The largest batch the program's memory plan holds for its input."""
    graph = program.exported_program()
    user_input = graph.graph_signature.user_inputs[0]
    node = next(n for n in graph.graph_module.graph.nodes if n.op == "placeholder" and n.name == user_input)
    return int(node.meta["spec"].shape[0])
