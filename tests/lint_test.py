"""The code is linted: `ruff check` with the rules of ruff.toml finds nothing, and the package's
imports keep the layers of .importlinter, with no cycle (`lint-imports`)."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
  path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
  assert path, f'{name} is not installed: pip install -e ".[test]"'
  return path


def test_ruff_check_is_clean():
  result = subprocess.run([_tool('ruff'), 'check', '--no-cache', '--output-format', 'concise',
                           REPO], capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_imports_keep_the_layers_and_have_no_cycle():
  result = subprocess.run([_tool('lint-imports'), '--no-cache'], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
  assert 'Contracts: 2 kept, 0 broken.' in result.stdout
