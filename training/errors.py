"""Stage 2's user errors, importable without torch (the CLI reports them in one line, exit 2)."""

from __future__ import annotations


class ModelLoadError(FileNotFoundError):
    """A model folder named in the config is missing or is not a saved model."""


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing or incomplete."""


class SampleInputError(ValueError):
    """Unusable sampling inputs (a keypoints table of the wrong shape, an audio rate the encoder cannot take)."""


class TrainingDataError(ValueError):
    """The training tables hold no usable window (too few face frames for the configured length)."""
