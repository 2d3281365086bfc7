"""probe: background-bias experiments on cached spatial features of frozen vision backbones."""

__version__ = "0.1.0"
