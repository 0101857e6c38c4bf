"""Errors a user can act on. Stage CLIs print these as one clear message and exit non-zero."""


class PipelineError(Exception):
    """Base class: bad input, bad params or mismatched artefacts. The message names file, row or key."""


class DataError(PipelineError):
    """A data file or row that cannot be used."""


class ArtifactError(PipelineError):
    """An artefact from an earlier stage that is missing, incomplete or does not match this run."""
