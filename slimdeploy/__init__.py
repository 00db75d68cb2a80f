"""slimdeploy: network slimming for deployment.

The library API (see :mod:`slimdeploy.api`): :func:`sparsify`, :func:`prune`, :func:`save_pruned`,
:func:`load_pruned`, :func:`export_onnx`, :func:`benchmark`.
They are imported, and torch with them, when first used: ``slimdeploy compress --help`` starts without torch.
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["sparsify", "prune", "save_pruned", "load_pruned", "export_onnx", "benchmark", "__version__"]
_API = frozenset(__all__) - {"__version__"}


class _Package(types.ModuleType):
    # Resolved on every access, not in a module __getattr__: importing the submodule slimdeploy.prune sets
    # the package's attribute `prune`, and `slimdeploy.prune` has to stay the function.
    def __getattribute__(self, name: str):
        if name in _API:
            from slimdeploy import api

            return getattr(api, name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
