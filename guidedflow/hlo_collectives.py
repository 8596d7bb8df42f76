"""The collectives of one step, read from a compiled program's optimized HLO text.

What the text shows is not what a step runs, in three ways this module undoes:
  * Loops: a collective inside a while body (the scanned DiT blocks, forward and backward)
    runs once per iteration. Each computation's executions per step are its callers'
    executions × the loop's trip count (read from the loop condition's `i < N`).
  * Async collectives: XLA:TPU splits one collective into a start and continuation fusions
    that each repeat the op (same `channel_id`): a channel is counted once.
  * Reduce-scatter: XLA:TPU writes it as an `all-reduce-scatter` fusion (an all-reduce whose
    result is dynamic-sliced to this device's shard, emitted as one reduce-scatter). It is
    counted as a reduce-scatter of the shard, not as an all-reduce of the whole array.

Bytes are per device and per execution, of the result (the gathered array for all-gather, the
shard for reduce-scatter, the array for all-reduce).
"""

import collections
import math
import re

OPS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_HEADER = re.compile(r'^(?:ENTRY\s+)?%(?P<name>\S+)\s+\(.*\{\s*$')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%(?P<name>\S+)\s*=\s*(?P<type>.*?)\s(?P<op>[a-z][a-z0-9-]*)\(')
_CALLEES = re.compile(r'\b(?P<kind>calls|to_apply|body|condition)=%(?P<name>[^\s,)}]+)')
_BRANCHES = re.compile(r'branch_computations=\{(?P<names>[^}]*)\}')
_CHANNEL = re.compile(r'channel_id=(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')
_TRIP = re.compile(r'compare\([^)]*\),\s*direction=LT')
_INT_CONSTANT = re.compile(r'=\s*s(?:32|64)\[\]\S*\s+constant\((\d+)\)')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
          's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
REDUCE_SCATTER_FUSION = 'all-reduce-scatter'
_OPERANDS_IN_RESULT = ('all-gather', 'collective-permute')


def array_bytes(hlo_type):
  """Bytes of an HLO result type (an array or a tuple of arrays; layouts ignored)."""
  return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in _ARRAY.findall(hlo_type))


def _computations(hlo_text):
  """{name: [instruction lines]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group('name'), [])
      if line.startswith('ENTRY'):
        entry = header.group('name')
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)
  return computations, entry


def _trip_count(condition_lines):
  """N of a loop whose condition is `i < N` with N a constant (JAX's scans and fori_loops);
  None when the condition is anything else."""
  text = '\n'.join(condition_lines)
  constants = _INT_CONSTANT.findall(text)
  if _TRIP.search(text) and len(constants) == 1:
    return int(constants[0])
  return None


def executions(computations, entry):
  """({computation: executions per run of `entry`}, whether every loop's trip count was
  known; an unknown loop counts once)."""
  calls = collections.defaultdict(list)  # callee -> [(caller, times per caller execution)]
  all_known = True
  for caller, lines in computations.items():
    for line in lines:
      callees = {m.group('kind'): m.group('name') for m in _CALLEES.finditer(line)}
      trips = 1
      if 'body' in callees:
        trips = _trip_count(computations.get(callees.get('condition'), []))
        all_known &= trips is not None
        trips = trips or 1
      for kind, name in callees.items():
        calls[name].append((caller, trips if kind in ('body', 'condition') else 1))
      for branches in _BRANCHES.finditer(line):
        for name in re.findall(r'%([^\s,]+)', branches.group('names')):
          calls[name].append((caller, 1))
  memo = {entry: 1}

  def count(name, seen=()):
    if name not in memo:
      memo[name] = 0 if name in seen else sum(
          count(caller, seen + (name,)) * times for caller, times in calls.get(name, ()))
    return memo[name]

  return {name: count(name) for name in computations}, all_known


def instances(hlo_text):
  """The collectives one run of the program executes, one dict per collective: op, type (the
  result, e.g. 'f32[32,96]'), bytes (per execution, per device), count (executions per run),
  name (JAX's op_name: which part of the step); and whether every loop's trip count was read."""
  computations, entry = _computations(hlo_text)
  if entry is None:
    return [], False
  times, known = executions(computations, entry)
  seen = {}  # channel (or instruction) -> record
  for name, lines in computations.items():
    scatter = name.startswith(REDUCE_SCATTER_FUSION)
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or match.group('op').removesuffix('-start') not in OPS:
        continue
      op, hlo_type = match.group('op').removesuffix('-start'), match.group('type')
      if match.group('op').endswith('-start') and op in _OPERANDS_IN_RESULT:
        hlo_type = _outputs(hlo_type)
      if scatter and op == 'all-reduce':
        op, hlo_type = 'reduce-scatter', _root_type(lines)
      channel = _CHANNEL.search(line)
      key = ('channel', channel.group(1)) if channel else ('instruction', match.group('name'))
      op_name = _OP_NAME.search(line)
      record = seen.setdefault(key, {
          'op': op, 'type': re.sub(r'\{[^{}]*\}', '', hlo_type), 'bytes': array_bytes(hlo_type),
          'count': 0, 'name': op_name.group(1) if op_name else ''})
      record['count'] = max(record['count'], times.get(name, 0))
      record['name'] = record['name'] or (op_name.group(1) if op_name else '')
  return [r for r in seen.values() if r['count']], known


def collectives(hlo_text):
  """{op: {'count', 'bytes'}} per run of the program (per device; see the module docstring),
  and whether every loop's trip count was read."""
  records, known = instances(hlo_text)
  return summarize(records), known


def summarize(records):
  """{op: {'count', 'bytes'}} of `instances`' records."""
  out = {}
  for r in records:
    entry = out.setdefault(r['op'], {'count': 0, 'bytes': 0})
    entry['count'] += r['count']
    entry['bytes'] += r['bytes'] * r['count']
  return out


def largest(records, count=3):
  """'op type ×count (MB)' of the collectives that move the most bytes per run."""
  top = sorted(records, key=lambda r: r['bytes'] * r['count'], reverse=True)[:count]
  return [f'{r["op"]} {r["type"]} ×{r["count"]} ({r["bytes"] * r["count"] / 2**20:.1f} MB)'
          for r in top]


def _outputs(hlo_type):
  """The output arrays of an async start's result tuple: XLA writes (operands, outputs[,
  u32[] contexts]) for all-gather-start and collective-permute-start."""
  arrays = [m.group(0) for m in _ARRAY.finditer(hlo_type) if m.group(2)]
  if len(arrays) < 2:
    return hlo_type
  return '(' + ', '.join(arrays[len(arrays) // 2:]) + ')'


def _root_type(lines):
  for line in lines:
    if line.lstrip().startswith('ROOT'):
      match = _INSTRUCTION.match(line)
      if match:
        return match.group('type')
  return ''

