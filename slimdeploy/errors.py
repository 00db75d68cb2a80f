"""The project's errors. Each carries the command-line exit code it maps to, so the CLI catches
:class:`SlimdeployError` once: 2 for input the user can fix (recipe, arguments, model, weights, data),
1 for failures at run time. Messages are one line that names the key or file."""

from __future__ import annotations


class SlimdeployError(Exception):
    """A failure the command line reports in one line, with exit code 1."""

    exit_code = 1


class InputError(SlimdeployError, ValueError):
    """Input that cannot be used: a recipe key, an argument, a model factory, weights or a data folder."""

    exit_code = 2


class ModelError(InputError):
    """A model that cannot be built, loaded or pruned as asked."""
