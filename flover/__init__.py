"""flover: temporal fusion for autoregressive inference."""

__version__ = "0.1.0"
