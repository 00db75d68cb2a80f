"""slimdeploy: network slimming for deployment."""

__version__ = "0.1.0"
