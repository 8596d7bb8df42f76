"""The one base class of errors whose message already says what is wrong and how to fix it.

`main` prints such an error as one line (no traceback) and exits with status 1. Every layer
raises its own subclass (a bad config, missing data, a checkpoint of another model, ...), so
this module imports nothing.
"""


class UserError(Exception):
  """A problem the user fixes (config, data, files on disk); the message names the fix."""


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the key and the allowed values."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A workdir holds no (finished) checkpoint of what was asked for; the message says how to
  make one."""
