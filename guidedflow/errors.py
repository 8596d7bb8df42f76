"""The one base class of errors whose message already says what is wrong and how to fix it,
and `one_line`, which turns any exception into a line such a message can quote.

`main` prints such an error as one line (no traceback) and exits with status 1. Every layer
raises its own subclass (a bad config, missing data, a checkpoint of another model, ...), so
this module imports nothing.
"""


class UserError(Exception):
  """A problem the user fixes (config, data, files on disk); the message names the fix."""


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the key and the allowed values."""


class DataError(UserError, ValueError):
  """Data missing or malformed; the message says what is wrong and how to fix it."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A workdir holds no (finished) checkpoint of what was asked for; the message says how to
  make one."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """`error` as one short line: the type and first message line of the error it was raised
  from at the bottom of its chain (tensorstore's own error, not orbax's wrappers)."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None and id(
      error.__cause__ or error.__context__) not in seen:
    error = error.__cause__ or error.__context__
    seen.add(id(error))
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'.strip()
  return text if len(text) <= limit else text[:limit - 3] + '...'
