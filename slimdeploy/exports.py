"""The formats of ``--export``, importable without torch so that ``slimdeploy compress --help`` lists them.

After both models are exported to ONNX and checked, the pipeline runs the format's own stage, named here
by import path (``module:function``, imported only then): a function of the run context, the dense and
pruned models and each runtime's files, whose result goes into the report's int8 entry. A format without a stage (None) adds nothing.
"""

from __future__ import annotations

from slimdeploy.registry import Registry

EXPORTS: Registry[str | None] = Registry("export format")
EXPORTS.register("onnx", description="dense and pruned models in ONNX, checked in onnxruntime")(None)
EXPORTS.register("onnx-int8", description="ONNX, plus both models quantized to static INT8 (QDQ)")(
    "slimdeploy.pipeline:int8_stage")
