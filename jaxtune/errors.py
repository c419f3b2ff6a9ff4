"""User-facing errors.

Anything a person can fix (a bad recipe key, a missing file, a malformed data row) raises
`JaxtuneError` with one readable line; the CLI prints it and exits with code 2, never a traceback.
"""


class JaxtuneError(Exception):
    """A mistake in user input, reported as one line without a traceback."""


class ConfigError(JaxtuneError):
    """A recipe or override that does not validate."""


class DataError(JaxtuneError):
    """A data source that cannot be read: names the file and, where known, the row."""


class ModelLoadError(JaxtuneError):
    """A model folder or checkpoint that cannot be loaded."""
