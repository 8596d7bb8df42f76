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


def _headings(text):
  """(level, title) of the markdown headings outside code blocks."""
  found, fence = [], False
  for line in text.splitlines():
    if line.startswith('```'):
      fence = not fence
    match = None if fence else re.match(r'^(#+) (.*)$', line)
    if match:
      found.append((len(match.group(1)), match.group(2).strip()))
  return found


def _slug(title):
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', title.lower()).replace(' ', '-')


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'docs', '*.md'))),
                         ids=os.path.basename)
def test_docs_pages_open_with_their_contents(path):
  """Each docs page has one title and a "Contents" list of its sections, in order."""
  text = open(path, encoding='utf-8').read()
  heads = _headings(text)
  assert [level for level, _ in heads].count(1) == 1 and heads[0][0] == 1, (
      f'{os.path.basename(path)}: one "# title" first')
  contents = text.split('## Contents', 1)
  assert len(contents) == 2, f'{os.path.basename(path)} has no "## Contents"'
  listed = re.findall(r'^\s*- \[(.+)\]\(#([^)]+)\)$', contents[1].split('\n\n', 2)[1], re.M)
  sections = [title for level, title in heads if level in (2, 3) and title != 'Contents']
  assert [title for title, _ in listed] == sections, os.path.basename(path)
  assert [anchor for _, anchor in listed] == [_slug(title) for title in sections]


@pytest.mark.parametrize('path', DOCS, ids=os.path.basename)
def test_section_links_resolve(path):
  """A link to `page.md#section` (or `#section`) names a heading that page has."""
  text = open(path, encoding='utf-8').read()
  broken = []
  for target in re.findall(r'\]\(([^)\s]*#[^)\s]+)\)', text):
    if re.match(r'[a-z]+://', target):
      continue
    page, anchor = target.split('#', 1)
    page_path = os.path.join(os.path.dirname(path), page) if page else path
    if not page_path.endswith('.md') or not os.path.exists(page_path):
      continue  # a missing file is test_links_and_images_exist's
    slugs = {_slug(title) for _, title in _headings(open(page_path, encoding='utf-8').read())}
    if anchor not in slugs:
      broken.append(target)
  assert not broken, f'{os.path.basename(path)} links to sections that do not exist: {broken}'
