"""The machine a benchmark ran on, as its printed numbers name it: the CPU's model name and
model number (these hosts' Xeons differ by model: 167 has AMX, 207 AVX-512 without it), core
count and the vector / matrix units that decide XLA:CPU's speed."""

import os
import platform


def cpu_description(cpuinfo_path='/proc/cpuinfo'):
  """'Intel(R) Xeon(R) Processor, model 207 (2 cores; avx2 avx512f avx512_bf16)'."""
  try:
    with open(cpuinfo_path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError:
    return f'{platform.processor() or "unknown"} ({os.cpu_count()} cores)'

  def field(name):
    return next((line.split(':', 1)[1].strip() for line in lines
                 if line.split(':', 1)[0].strip() == name), None)

  name, model = field('model name') or 'unknown', field('model')
  units = [u for u in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')
           if u in (field('flags') or '').split()]
  return (f"{name}{f', model {model}' if model else ''} ({os.cpu_count()} cores; "
          f"{' '.join(units) or 'no avx2'})")


if __name__ == '__main__':
  print(cpu_description())
