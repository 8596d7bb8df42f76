"""The code is linted: `ruff check` with the rules of ruff.toml finds nothing."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
  ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
  assert ruff, 'ruff is not installed: pip install -e ".[test]"'
  result = subprocess.run([ruff, 'check', '--no-cache', '--output-format', 'concise', REPO],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
