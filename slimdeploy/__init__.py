"""slimdeploy: network slimming for deployment.

The library API (see :mod:`slimdeploy.api`): :func:`sparsify`, :func:`prune`, :func:`save_pruned`,
:func:`load_pruned`, :func:`export_onnx`, :func:`benchmark`.
"""

__version__ = "0.1.0"

from slimdeploy.api import benchmark, export_onnx, load_pruned, prune, save_pruned, sparsify  # noqa: E402

__all__ = ["sparsify", "prune", "save_pruned", "load_pruned", "export_onnx", "benchmark", "__version__"]
