"""Command-line parsing of guidedflow.main: every mistake in --config or a flag is one line.

absl parses the flags inside `app.run`, before `main` runs, and `config_flags` reports a
config file that is missing, does not compile or whose `get_config` raises, and an unknown
`--config.a.b` key, as tracebacks dozens of lines long (or, for a missing file, only on the
first access to FLAGS.config). `parse_flags` (`app.run(main, flags_parser=cli.parse_flags)`)
turns each into `error: <cause and fix>` on stderr and exit status 1; to name the cause it
loads the config file itself, as `config_flags` does (`path` or `path:arg` → `get_config(arg)`).
"""

import difflib
import importlib.util
import os
import re
import sys
import sysconfig
import traceback

from absl import flags
from ml_collections import config_dict

from guidedflow import errors

FLAGS = flags.FLAGS
_FLAG = 'config'
# Files of Python and installed packages: a config's error is reported at the innermost frame
# outside them (the config file, or a config it imports).
_LIBRARY_DIRS = tuple(os.path.realpath(sysconfig.get_paths()[k]) + os.sep
                      for k in ('stdlib', 'platstdlib', 'purelib', 'platlib'))


def parse_flags(argv):
  """absl `flags_parser`: parses `argv` into FLAGS and returns the arguments left for `main`;
  on a mistake prints one `error: ...` line and exits with status 1."""
  try:
    try:
      remaining = FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # config_flags raises anything
      raise diagnose(argv, e) from None
    if not isinstance(FLAGS[_FLAG].value, config_dict.ConfigDict):
      # config_flags defers a missing file's error to the first access of FLAGS.config.
      raise diagnose(argv, None)
    return remaining
  except errors.UserError as e:
    _exit(e)


def get_config():
  """FLAGS.config, or one `error:` line and exit status 1 when the config did not load."""
  config = FLAGS[_FLAG].value
  if not isinstance(config, config_dict.ConfigDict):
    _exit(diagnose(sys.argv, None))
  return config


def _exit(error):
  print(f'error: {error}', file=sys.stderr)
  sys.exit(1)


def diagnose(argv, error):
  """The ConfigError that names the cause of `error`, raised by absl while parsing `argv`
  (None: the config did not load but nothing was raised): the config file's own error, then
  an unknown override key, else `error`'s first line."""
  try:  # --flagfile=FILE may hold --config and its overrides, as config_flags reads them
    argv = FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:  # an unreadable --flagfile: absl's own error, reported below, names it
    argv = list(argv)
  spec = config_spec(argv)
  if spec is not None:
    try:
      config = load_config(spec)
    except errors.ConfigError as e:
      return e
    for shown, dotted in _overrides(argv):
      problem = unknown_key(config, dotted)
      if problem:
        return errors.ConfigError(f'{shown}: {problem}')
  if error is None:
    return errors.ConfigError(f'--config {spec}: the config did not load; check the file.')
  text = (str(error).strip() or type(error).__name__).splitlines()[0]
  if isinstance(error, flags.Error):  # e.g. a bad value of a flag or of a --config.key
    return errors.ConfigError(f'{text.rstrip(".")}. Run with --helpshort to see the flags.')
  return errors.ConfigError(f'{type(error).__name__} while parsing the flags: {text}')


def config_spec(argv):
  """The value of --config in `argv` ('path' or 'path:arg'; the last one given), or None."""
  spec = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == '--':
      break
    match = re.fullmatch(rf'--?{_FLAG}(=(.*))?', arg, re.DOTALL)
    if match:
      spec = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return spec


def _overrides(argv):
  """(the argument as given, dotted key) of each --config.<key>[=value] in `argv`."""
  for arg in argv[1:]:
    if arg == '--':
      break
    match = re.match(rf'--?(?:no)?{_FLAG}\.([^=]+)', arg)
    if match:
      yield arg, match.group(1)


def unknown_key(config, dotted):
  """Why `config` has no key `dotted` ('train.num_steps'), with close matches; None if it has."""
  node, where = config, 'config'
  for part in dotted.split('.'):
    if not isinstance(node, config_dict.ConfigDict):
      return (f'{where} is a value ({type(node).__name__}), not a group of keys: set it '
              f'with --{where}=VALUE.')
    if part not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=3)
      guess = f'did you mean {" or ".join(map(repr, close))}?; ' if close else ''
      return f'{where} has no key {part!r} ({guess}its keys: {", ".join(keys)}).'
    node, where = node[part], f'{where}.{part}'
  return None


def load_config(spec):
  """`get_config(arg)` of the config file `spec` ('path' or 'path:arg'), as config_flags
  loads it.

  Raises:
    ConfigError: the file is missing, does not compile or import, has no get_config, or
      get_config raises or returns no ConfigDict; the message gives file:line and the fix.
  """
  path, *args = spec.split(':', 1)
  if not os.path.isfile(path):
    raise errors.ConfigError(_missing_file(spec, path))
  module_spec = importlib.util.spec_from_file_location('_guidedflow_checked_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise errors.ConfigError(
        f'--config {spec}: {type(e).__name__} at {_relative(e.filename)}:{e.lineno}: {e.msg}; '
        'fix the config file.') from None
  except Exception as e:  # pylint: disable=broad-except  # whatever the file's code raises
    raise errors.ConfigError(_raised(spec, path, 'importing it', e)) from None
  get = getattr(module, 'get_config', None)
  if not callable(get):
    raise errors.ConfigError(f'--config {spec}: {path} defines no get_config(); a config file '
                             'defines get_config() returning an ml_collections.ConfigDict.')
  try:
    config = get(*args)
  except Exception as e:  # pylint: disable=broad-except
    at = f'{_relative(get.__code__.co_filename)}:{get.__code__.co_firstlineno}'
    call = f'get_config({", ".join(map(repr, args))})'
    raise errors.ConfigError(_raised(spec, path, call, e, default_at=at)) from None
  if not isinstance(config, config_dict.ConfigDict):
    raise errors.ConfigError(f'--config {spec}: get_config() returned {type(config).__name__}, '
                             'not an ml_collections.ConfigDict; fix its return statement.')
  return config


def _missing_file(spec, path):
  where = os.path.dirname(path) or '.'
  hint = ''
  if os.path.isdir(where):
    stems = sorted(n[:-3] for n in os.listdir(where) if n.endswith('.py') and n != '__init__.py')
    # Names compared without '.py' (its shared letters would make unrelated names look close).
    close = difflib.get_close_matches(os.path.basename(path).removesuffix('.py'), stems, n=3)
    if close:
      hint = f' (did you mean {" or ".join(os.path.join(where, n + ".py") for n in close)}?)'
  what = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
  return (f'--config {spec}: config file {path} {what}{hint}, relative to the working '
          f'directory {os.getcwd()}; run from the repository root or give the file\'s path, '
          'e.g. --config configs/tiny.py.')


def _raised(spec, path, during, error, default_at=None):
  """The message of `error`, raised by the config file `path` while `during`."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not os.path.realpath(f.filename).startswith(_LIBRARY_DIRS)
            and os.path.realpath(f.filename) != os.path.realpath(__file__)]
  at = f'{_relative(frames[-1].filename)}:{frames[-1].lineno}' if frames else default_at
  text = (str(error).strip().splitlines() or [''])[0]
  fix = 'fix the config file' + (' or its argument' if ':' in spec else '')
  if isinstance(error, ModuleNotFoundError) and (error.name or '').startswith('configs'):
    fix = 'run from the repository root (where configs/ is a package)'
  location = f' at {at}' if at else f' in {path}'
  return f'--config {spec}: {during} raised {type(error).__name__}{location}: {text}; {fix}.'


def _relative(filename):
  relative = os.path.relpath(filename) if filename else '?'
  return filename if relative.startswith('..') else relative
