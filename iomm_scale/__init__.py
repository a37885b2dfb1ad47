"""iomm-scale: training system for IOMM-style unified multimodal image generators."""

__version__ = "0.1.0"
