"""Docs are code: every relative link and image in README.md and docs/*.md exists, and every
`--config.<key>` they mention is a key of some config in configs/."""

import glob
import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, 'README.md')] + sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))


def _config_keys():
  keys = set()
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    name = os.path.basename(path)[:-3]
    if name.startswith('_'):
      continue
    config = importlib.import_module(f'configs.{name}').get_config()

    def walk(node, prefix=''):
      for key, value in node.items():
        if hasattr(value, 'items'):
          walk(value, f'{prefix}{key}.')
        keys.add(f'{prefix}{key}')

    walk(config)
  return keys


@pytest.mark.parametrize('path', DOCS, ids=os.path.basename)
def test_links_and_images_exist(path):
  text = open(path, encoding='utf-8').read()
  targets = re.findall(r'\]\(([^)\s]+)\)', text) + re.findall(r'<img src="([^"]+)"', text)
  missing = [t for t in targets
             if not re.match(r'[a-z]+://|#|mailto:', t)
             and not os.path.exists(os.path.join(os.path.dirname(path), t.split('#')[0]))]
  assert not missing, f'{os.path.basename(path)} links to missing files: {missing}'


def test_documented_config_keys_exist():
  keys = _config_keys()
  unknown = {}
  for path in DOCS:
    lines = open(path, encoding='utf-8').read().splitlines()
    text = '\n'.join(line for line in lines if 'has no key' not in line)  # error examples
    for key in re.findall(r'--config\.([a-z0-9_.]+[a-z0-9_])', text):
      if key not in keys:
        unknown.setdefault(os.path.basename(path), set()).add(key)
  assert not unknown, f'config keys in the docs that no config has: {unknown}'
