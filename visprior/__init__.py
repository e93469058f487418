"""visprior: Lightning recipes for how language models learn to see."""

__version__ = "0.1.0"
