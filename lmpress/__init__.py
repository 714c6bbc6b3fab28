"""lmpress: recipe-driven compression of pretrained language models."""

__version__ = "0.1.0"
