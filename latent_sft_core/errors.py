"""Errors a user can act on. Stage CLIs print these as one clear message and exit non-zero; ``loud_warning`` is
for a result that is written but must not pass unnoticed."""

import logging


class PipelineError(Exception):
    """Base class: bad input, bad params or mismatched artefacts. The message names file, row or key."""


class DataError(PipelineError):
    """A data file or row that cannot be used."""


class ArtifactError(PipelineError):
    """An artefact from an earlier stage that is missing, incomplete or does not match this run."""


def loud_warning(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning between two rules of '=', so that it stands out of a stage's long output."""
    banner = "=" * 100
    logger.warning("\n%s\n%s\n%s", banner, message, banner)
