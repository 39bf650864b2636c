"""SnapGen: efficient text-to-image generation."""

__version__ = "0.1.0"
