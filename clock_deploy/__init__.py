"""clock-deploy: distill, export and benchmark compact DETR detectors."""

__version__ = "0.1.0"
