"""CogPortrait: data engine and generator for fine-grained eye-region control in portrait animation."""

__version__ = "0.1.0"
