"""The guidance methods and the solvers side by side: each method's main knob swept (issue 49).

    # the Gaussian-mixture toy only (exact u(x|y), u(x|∅); seconds to minutes)
    python benchmarks/guidance_methods.py --out runs/guidance_methods_toy.jsonl
    # the toy and a trained Fashion-MNIST checkpoint, with the two figures
    python benchmarks/guidance_methods.py --config configs/fashion_mnist.py --workdir runs/fmnist \
        [--samples_per_class 500] --out runs/guidance_methods.jsonl \
        --plot docs/guidance_methods_curves.png,docs/guidance_methods_solvers.png
    # the decisive points only, at N = 5,000 (issue 49's targets)
    python benchmarks/guidance_methods.py --config configs/fashion_mnist.py --workdir runs/fmnist \
        --parts fmnist --fmnist_grid focus --samples_per_class 500 --autoguidance_step 4800 \
        --out runs/focus.jsonl
    # before the default switch: CFG at w = 1.25, CFG++ along λ; the two candidates at seed 1
    python benchmarks/guidance_methods.py --config configs/fashion_mnist.py --workdir runs/fmnist \
        --parts fmnist --fmnist_grid followup --samples_per_class 500 --out runs/followup.jsonl
    python benchmarks/guidance_methods.py --config configs/fashion_mnist.py --workdir runs/fmnist \
        --config.sampling.seed=1 --parts fmnist --fmnist_grid pair --samples_per_class 500 \
        --out runs/followup.jsonl
    # redraw the figures and tables of an existing JSON-lines file (measures nothing)
    python benchmarks/guidance_methods.py --replot runs/guidance_methods.jsonl --plot a.png,b.png
    python benchmarks/guidance_methods.py --smoke   # tiny, toy only, seconds

Methods (`config.sampling.guidance_method`, docs/guidance_methods.md) and what is swept:
CFG: w; rescale: φ at a few w; CFG-Zero*: K and the optimized scale at a few w; APG: η and r
(and the reverse momentum β) at a few w; CFG++: λ (the w column; Euler and DPM-Solver++(2M));
autoguidance: w, the weak model on the toy the exact field of the mixture with every component's
std × `TOY_WEAK_STD_SCALE` (a blurrier p(x|y), as an under-trained model's), on Fashion-MNIST
the checkpoint of `--autoguidance_step`. Solvers (`config.sampling.method`, docs/solvers.md):
steps with plain CFG. A Fashion-MNIST point that names no sampler or w runs
`FMNIST_REFERENCE_SAMPLER` (Heun 10) at `FMNIST_REFERENCE_W` (1.5), not the config's sampler.

1. **Toy** (tests/gaussian_mixture.py, linear path, velocity, the exact model; Heun with
   `--toy_steps` unless a solver point says otherwise): per class, energy distance of the
   samples to an equal number of exact draws from p(x|y) (`ed`, averaged over the classes);
   fidelity = mean log p(y|x) under the exact classifier at t = 1 (`log_p_y`, 0 is best) and its
   accuracy (argmax p(y|x) = y) -- both saturate on this toy, whose classes barely overlap at
   t = 1 -- and the mean exact log-density log p(x|y) of the samples (`log_p_x`, the toy's
   fidelity axis in the figure: guidance concentrates samples where p(x|y) is high); diversity = per-class spread, the rms distance of a class's
   samples to their mean divided by the exact p(x|y)'s (`spread`, 1 is the data's); and the
   k-NN precision/recall in the plane against the exact draws.
2. **Fashion-MNIST** (`--workdir`, `--config`): samples `samples_per_class` per class from the
   EMA weights (`Sampler.from_workdir`) and measures them with `evaluate.Evaluator` in every
   feature space the config names (`eval.feature_network` + `eval.extra_feature_networks`): FD,
   precision, recall, class accuracy; black-pixel fraction, NFE and seconds (compile included).

Writes one JSON line per point to `--out` and prints markdown tables. Prints numbers only; it
asserts nothing (and nothing here is timed against a target).
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

# The repository root: the config files import `configs`, the toy lives in `tests`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from guidedflow import host_allocator
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config the checkpoint was trained with '
                                '(with --workdir).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir of a trained Fashion-MNIST checkpoint (optional: '
                    'without it only the toy runs).')
flags.DEFINE_integer('samples_per_class', 500, 'Fashion-MNIST samples per class and point.')
flags.DEFINE_integer('toy_samples_per_class', 2000, 'Toy samples per class and point.')
flags.DEFINE_integer('toy_steps', 10, 'Toy sampler steps (Heun) for the guidance-method points.')
flags.DEFINE_list('parts', ['toy', 'fmnist'], 'Which parts to run (fmnist needs --workdir).')
flags.DEFINE_list('methods', ['cfg', 'rescale', 'cfg_zero_star', 'apg', 'cfg_pp', 'autoguidance',
                             'solvers'],
                  'Which sweeps to run.')
flags.DEFINE_enum('fmnist_grid', 'sweep',
                  ['sweep', 'focus', 'followup', 'pair', 'solvers', 'others'],
                  'Fashion-MNIST points: every method\'s sweep; the few decisive ones '
                  '(`grid(\'fmnist_focus\')`) for a large --samples_per_class; the default '
                  'switch\'s follow-up (`fmnist_followup`: CFG at w = 1.25, CFG++ along λ); or '
                  'the two candidates only (`fmnist_pair`, for a second --config.sampling.seed); '
                  'the solvers at w = 1 below NFE 20 (`fmnist_solvers`); or rescale and '
                  'CFG-Zero* where CFG is best (`fmnist_others`).')
flags.DEFINE_integer('autoguidance_step', None, 'Fashion-MNIST autoguidance points: the step '
                     'of --workdir whose checkpoint is the weak model.')
flags.DEFINE_bool('smoke', False, 'Tiny toy-only run (seconds): a few points, few samples.')
flags.DEFINE_string('out', None, 'Append one JSON line per point here.')
flags.DEFINE_string('replot', None, 'Measure nothing: read this JSON-lines file, print its '
                    'tables and draw --plot.')
flags.DEFINE_float('figure_toy_w', 4.0, 'The toy panel draws the method curves at this w only '
                   '(and CFG along w), to stay readable.')
flags.DEFINE_list('plot', None, 'Two PNG paths: every method\'s fidelity-diversity curves '
                  '(FD against accuracy, precision against recall), and FD against NFE for the '
                  'solvers.')

TOY_W = 1.0  # the toy's w for the solver points: the target is then p(x|y) itself, and the
# energy distance measures the solver's error (plus the sampling floor)
TOY_WEAK_STD_SCALE = 1.5  # autoguidance's weak model on the toy: components' std × this
# Fashion-MNIST points that name no sampler or w: CFG's reference, the measured points' (Heun 10
# steps, w = 1.5: configs/fashion_mnist.py's sampler before CFG++ became its default).
FMNIST_REFERENCE_SAMPLER, FMNIST_REFERENCE_W = ('heun', 10), 1.5


def _neutral():
  return dict(guidance_method='cfg', rescale_phi=0.0, zero_star_optimized_scale=True,
              zero_star_init_steps=0, apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0)


def _point(sweep, w, method='cfg', sampler=None, steps=None, **knobs):
  settings = {**_neutral(), 'guidance_method': method, **knobs}
  return dict(sweep=sweep, w=None if w is None else float(w), method=sampler, steps=steps, settings=settings)


def grid(part, smoke=False):
  """The points of one part: [(sweep, w, sampler settings)]; `part` is 'toy' or 'fmnist'."""
  if smoke:
    return [_point('cfg', w) for w in (1.0, 3.0)] + [
        _point('rescale', 3.0, 'rescale', rescale_phi=0.7),
        _point('cfg_zero_star', 3.0, 'cfg_zero_star', zero_star_init_steps=1),
        _point('apg', 3.0, 'apg', apg_eta=0.0, apg_norm_threshold=1.0),
        _point('cfg_pp', 0.5, 'cfg_pp', sampler='euler'),
        _point('autoguidance', 3.0, 'autoguidance'),
        _point('solvers', TOY_W, sampler='dpmpp_2m', steps=4)]
  if part == 'toy':
    ws = (2.0, 4.0, 6.0)
    points = [_point('cfg', w) for w in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    points += [_point('rescale', w, 'rescale', rescale_phi=phi)
               for w in ws for phi in (0.3, 0.7, 1.0)]
    points += [_point('cfg_zero_star', w, 'cfg_zero_star', zero_star_optimized_scale=opt,
                      zero_star_init_steps=k)
               for w in ws for opt in (True, False) for k in (0, 1, 2) if opt or k]
    points += [_point('apg', w, 'apg', apg_eta=eta, apg_norm_threshold=r)
               for w in ws for eta in (0.0, 0.5) for r in (0.0, 0.5, 1.0)]
    points += [_point('apg', w, 'apg', apg_eta=0.0, apg_norm_threshold=1.0, apg_momentum=-0.5)
               for w in ws]
    points += [_point('cfg_pp', lam, 'cfg_pp', sampler=s)
               for s in ('euler', 'dpmpp_2m') for lam in (0.0, 0.2, 0.4, 0.6, 1.0)]
    points += [_point('autoguidance', w, 'autoguidance') for w in (1.5, 2.0, 3.0, 4.0)]
    points += [_point('solvers', TOY_W, sampler=s, steps=n)
               for s in ('euler', 'heun', 'dpmpp_2m', 'unipc') for n in (4, 8, 16, 32)]
    return points
  if part == 'fmnist_focus':
    # The decisive points at large N (issue 49's targets), most decisive first: CFG at its FD
    # optimum against the pilot's best APG setting (NFE 38); the solvers at w = 1 against
    # Heun-25; then autoguidance (weak model: --autoguidance_step) and CFG++ (DPM-Solver++(2M)
    # 19 steps, NFE 38).
    apg = dict(apg_eta=0.0, apg_norm_threshold=4.0, apg_momentum=-0.5)
    points = [_point('cfg', 1.5), _point('apg', 2.5, 'apg', **apg)]
    points += [_point('solvers', 1.0, sampler=s, steps=n)
               for s, n in (('heun', 25), ('unipc', 10), ('dpmpp_2m', 10))]
    points += [_point('cfg', 2.0), _point('autoguidance', 2.0, 'autoguidance'),
               _point('cfg_pp', 0.4, 'cfg_pp', sampler='dpmpp_2m', steps=19),
               _point('autoguidance', 3.0, 'autoguidance'), _point('apg', 2.0, 'apg', **apg),
               _point('solvers', 1.0, sampler='unipc', steps=5),
               _point('solvers', 1.0, sampler='heun', steps=10)]
    return points
  if part == 'fmnist_followup':
    # Before CFG++ becomes the default: CFG between its measured w = 1 and 1.5; CFG++ around
    # λ = 0.4 at NFE 38, and at NFE 20 (10 steps; λ doubled, as its w grows with the steps).
    return [_point('cfg', 1.25)] + [
        _point('cfg_pp', lam, 'cfg_pp', sampler='dpmpp_2m', steps=n)
        for lam, n in ((0.3, 19), (0.5, 19), (0.8, 10))]
  if part == 'fmnist_solvers':  # FD against NFE at w = 1 (the figure's low-NFE end)
    return [_point('solvers', 1.0, sampler=s, steps=n)
            for s, n in (('heun', 10), ('unipc', 5), ('dpmpp_2m', 5))]
  if part == 'fmnist_others':  # rescale and CFG-Zero* at N = 5,000, at w = 2 (NFE 38; 34)
    return [_point('rescale', 2.0, 'rescale', rescale_phi=0.7),
            _point('cfg_zero_star', 2.0, 'cfg_zero_star', zero_star_init_steps=0),
            _point('cfg_zero_star', 2.0, 'cfg_zero_star', zero_star_init_steps=1)]
  if part == 'fmnist_pair':  # today's default and the candidate (run again at another seed)
    return [_point('cfg', 1.5), _point('cfg_pp', 0.4, 'cfg_pp', sampler='dpmpp_2m', steps=19)]
  # Fashion-MNIST: a handful of points per method (each costs one compile and N samples).
  points = [_point('cfg', w) for w in (1.0, 1.5, 2.5, 4.0)]
  points += [_point('rescale', w, 'rescale', rescale_phi=0.7) for w in (2.5, 4.0)]
  points += [_point('cfg_zero_star', 2.5, 'cfg_zero_star', zero_star_init_steps=0),
             _point('cfg_zero_star', 2.5, 'cfg_zero_star', zero_star_init_steps=1),
             _point('cfg_zero_star', 4.0, 'cfg_zero_star', zero_star_init_steps=1)]
  points += [_point('apg', 4.0, 'apg', apg_eta=0.0),
             _point('apg', 4.0, 'apg', apg_eta=0.0, apg_norm_threshold=4.0),
             _point('apg', 2.5, 'apg', apg_eta=0.0, apg_norm_threshold=4.0, apg_momentum=-0.5)]
  # (autoguidance needs a weak checkpoint, sampling.autoguidance_step: not in this sweep)
  points += [_point('cfg_pp', lam, 'cfg_pp', sampler='euler') for lam in (0.2, 0.4)]
  points += [_point('solvers', None, sampler=s, steps=n)
             for s, n in (('euler', 10), ('dpmpp_2m', 5), ('dpmpp_2m', 10), ('unipc', 10))]
  return points


def knob_label(row):
  """The non-neutral knobs of a row, short ('φ=0.7', 'K=1 s*', 'η=0 r=4 β=-0.5'), and its
  seed unless 0."""
  return _knobs(row) + (f" seed {row['seed']}" if row.get('seed') else '')


def _knobs(row):
  s = row['settings']
  if row['sweep'] == 'solvers':
    return '–'
  if s['guidance_method'] == 'rescale':
    return f"φ={s['rescale_phi']:g}"
  if s['guidance_method'] == 'cfg_zero_star':
    return f"K={s['zero_star_init_steps']}" + (' s*' if s['zero_star_optimized_scale'] else '')
  if s['guidance_method'] == 'apg':
    label = f"η={s['apg_eta']:g} r={s['apg_norm_threshold']:g}"
    return label + (f" β={s['apg_momentum']:g}" if s['apg_momentum'] else '')
  if s['guidance_method'] == 'cfg_pp':
    return 'w is λ'
  if s['guidance_method'] == 'autoguidance':
    return f'weak σ×{TOY_WEAK_STD_SCALE:g}' if row['part'] == 'toy' else 'weak'
  return '–'


# ----------------------------------------------------------------------------- the toy


def run_toy(points, samples_per_class, steps, emit):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from guidedflow import evaluation  # pylint: disable=g-import-not-at-top
  from guidedflow import guidance  # pylint: disable=g-import-not-at-top
  from guidedflow import paths  # pylint: disable=g-import-not-at-top
  from guidedflow import sampling  # pylint: disable=g-import-not-at-top
  from tests import gaussian_mixture as gm  # pylint: disable=g-import-not-at-top

  path = paths.get_path('linear')
  model = gm.model(path, 'velocity')
  weak_model = gm.model(path, 'velocity', std_scale=TOY_WEAK_STD_SCALE)
  classes = np.arange(gm.NUM_CLASSES, dtype=np.int32)
  labels = jnp.asarray(np.repeat(classes, samples_per_class))
  exact = np.asarray(gm.sample_data(jax.random.PRNGKey(1), labels))
  energy = jax.jit(gm.energy_distance)

  def spread(x):
    return float(np.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))))

  exact_spread = {c: spread(exact[np.asarray(labels) == c]) for c in classes}
  # The floor: energy distance between two independent exact draws of the same size.
  again = np.asarray(gm.sample_data(jax.random.PRNGKey(2), labels))
  floor = float(np.mean([float(energy(jnp.asarray(again[np.asarray(labels) == c]),
                                      jnp.asarray(exact[np.asarray(labels) == c])))
                         for c in classes]))
  for p in points:
    method = guidance.GuidanceMethod(name=p['settings']['guidance_method'], **{
        k: v for k, v in p['settings'].items() if k != 'guidance_method'})
    sampler, num_steps = p['method'] or 'heun', p['steps'] or steps
    w = p['w']
    t0 = time.time()
    x, info = sampling.sample(model, jax.random.PRNGKey(0), labels, shape=(2,), path=path,
                              parameterization='velocity', null_label=gm.NULL,
                              guidance_scale=w, method=sampler, num_steps=num_steps,
                              sigma=0.5, guidance_method=method,
                              weak_model_fn=weak_model if method.uses_weak_model else None)
    x = np.asarray(jax.block_until_ready(x))
    seconds = time.time() - t0
    log_p_y = np.asarray(gm.classifier_log_prob(path, jnp.asarray(x), 1.0, labels))
    log_p_x = np.asarray(gm.log_prob(path, jnp.asarray(x), 1.0, labels))
    lab = np.asarray(labels)
    eds, spreads, precisions, recalls = [], [], [], []
    for c in classes:
      fake, real = x[lab == c], exact[lab == c]
      eds.append(float(energy(jnp.asarray(fake), jnp.asarray(real))))
      spreads.append(spread(fake) / exact_spread[c])
      pr = evaluation.precision_recall(real, fake, k=3)
      precisions.append(pr['precision'])
      recalls.append(pr['recall'])
    emit(dict(part='toy', sweep=p['sweep'], guidance_method=p['settings']['guidance_method'],
              w=w, sampler=sampler, steps=num_steps, settings=p['settings'],
              nfe=int(info['nfe']), num_samples=int(len(lab)),
              ed=round(float(np.mean(eds)), 5), ed_floor=round(floor, 5), log_p_y=float(f'{log_p_y.mean():.4g}'),
              log_p_x=round(float(log_p_x.mean()), 4),
              accuracy=round(float(np.mean(log_p_y > math.log(0.5))), 5),
              spread=round(float(np.mean(spreads)), 4),
              precision=round(float(np.mean(precisions)), 4),
              recall=round(float(np.mean(recalls)), 4), seconds=round(seconds, 3)))


# ----------------------------------------------------------------------------- Fashion-MNIST


def run_fmnist(config, workdir, points, samples_per_class, emit):
  from guidedflow import evaluate  # pylint: disable=g-import-not-at-top
  from guidedflow import feature_networks  # pylint: disable=g-import-not-at-top
  from guidedflow import input_pipeline  # pylint: disable=g-import-not-at-top
  from guidedflow import judges  # pylint: disable=g-import-not-at-top
  from guidedflow import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from guidedflow.tasks import registry  # pylint: disable=g-import-not-at-top

  registry.validate(config)
  names = feature_networks.names(config)
  if names[0] == 'none':
    raise app.UsageError('guidance_methods needs a feature network: set '
                         '--config.eval.feature_network=fmnist_classifier.')
  networks = [feature_networks.load(config, name) for name in names]
  sampler = sampler_lib.Sampler.from_workdir(config, workdir)
  eval_set = input_pipeline.create_dataset(config.input, config.input.eval_split)
  evaluator = evaluate.Evaluator(config, workdir, sampler, networks[0], eval_set,
                                 extra_networks=networks[1:])
  if any(p['settings']['guidance_method'] == 'autoguidance' for p in points):
    if FLAGS.autoguidance_step is None:
      raise app.UsageError('autoguidance points need --autoguidance_step (an earlier checkpoint '
                           'of --workdir, the weak model).')
    config.sampling.guidance_method = 'autoguidance'
    config.sampling.autoguidance_step = FLAGS.autoguidance_step
    sampler.weak_params = sampler_lib.load_weak_model(config, sampler.builder, workdir,
                                                      sampler.step)
  # A point without its own sampler or w runs CFG's reference: Heun 10 at w = 1.5 (the
  # config's sampler before CFG++ became its default), whatever the config samples with now.
  default_w = FMNIST_REFERENCE_W
  for p in points:
    # The sampler reads its method and knobs from config.sampling at every call (the plan):
    # set every knob (neutral where the point does not name it).
    for key, value in p['settings'].items():
      config.sampling[key] = value
    w = default_w if p['w'] is None else p['w']
    row, _, _ = evaluator.evaluate(samples_per_class=samples_per_class, guidance_scale=w,
                                   method=p['method'] or FMNIST_REFERENCE_SAMPLER[0],
                                   num_steps=p['steps'] or FMNIST_REFERENCE_SAMPLER[1])
    line = dict(part='fmnist', sweep=p['sweep'], guidance_method=p['settings']['guidance_method'],
                w=float(w), sampler=row['method'], steps=row['num_steps'],
                settings=p['settings'], nfe=row['nfe'], num_samples=row['num_samples'],
                seconds=row['sample_seconds'], images_per_s=row['images_per_s'],
                black_fraction=row.get('black_fraction'), step=sampler.step, seed=row['seed'],
                workdir=workdir, primary=names[0])
    for space, metrics in judges.spaces_of(row, names[0]).items():
      line[space] = {k: metrics.get(k) for k in ('fd', 'precision', 'recall', 'accuracy',
                                                'density', 'coverage')}
    emit(line)
  for key, value in _neutral().items():
    config.sampling[key] = value


# ----------------------------------------------------------------------------- tables, figures


def _spaces(rows):
  return [k for k in rows[0] if isinstance(rows[0][k], dict) and 'fd' in rows[0][k]]


def _fmt(v, digits=3):
  if v is None:
    return '–'
  if isinstance(v, float):
    return f'{v:.{digits}f}'
  return str(v)


def table(rows):
  """Markdown tables, one per part present; the best FD / energy distance of each sweep bold."""
  out = []
  for part in ('toy', 'fmnist'):
    group = [r for r in rows if r['part'] == part]
    if not group:
      continue
    key = 'ed' if part == 'toy' else None
    spaces = [] if part == 'toy' else _spaces(group)

    def score(r, part=part, spaces=spaces):
      return r['ed'] if part == 'toy' else r[spaces[0]]['fd']

    best = {}
    for r in group:
      if r['sweep'] not in best or score(r) < score(best[r['sweep']]):
        best[r['sweep']] = r
    if part == 'toy':
      head = ['method', 'w', 'knobs', 'sampler', 'NFE', 'energy dist.', 'log p(x|y)', 'log p(y|x)',
              'accuracy', 'spread', 'precision', 'recall', 's']
    else:
      head = ['method', 'w', 'knobs', 'sampler', 'NFE']
      for s in spaces:
        head += [f'FD {s}', f'prec. {s}', f'rec. {s}', f'acc. {s}']
      head += ['black px', 's']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
    for r in group:
      bold = best[r['sweep']] is r
      cells = [r['guidance_method'], f"{r['w']:g}", knob_label(r), f"{r['sampler']} {r['steps']}",
               str(r['nfe'])]
      if key:
        first = _fmt(r['ed'], 4)
        cells += [f'**{first}**' if bold else first, _fmt(r['log_p_x']),
                  f"{r['log_p_y']:.1e}", _fmt(r['accuracy']),
                  _fmt(r['spread']), _fmt(r['precision']), _fmt(r['recall']),
                  _fmt(r['seconds'], 2)]
      else:
        for i, s in enumerate(spaces):
          m = r[s]
          fd = _fmt(m['fd'], 2)
          cells += [f'**{fd}**' if bold and i == 0 else fd, _fmt(m['precision']),
                    _fmt(m['recall']), _fmt(m['accuracy'])]
        cells += [_fmt(r['black_fraction'], 4), _fmt(r['seconds'], 1)]
      lines.append('| ' + ' | '.join(cells) + ' |')
    title = (f"toy (Gaussian mixture, exact fields, N = {group[0]['num_samples']} per point; "
             f"energy distance of two exact draws: {group[0].get('ed_floor', float('nan')):.4f})"
             if part == 'toy' else
             f"Fashion-MNIST ({group[0]['workdir']}, step {group[0]['step']}, "
             f"N = {group[0]['num_samples']} per point)")
    out.append(f'{title}\n\n' + '\n'.join(lines) + '\n')
  return '\n'.join(out)


def _curves(rows):
  """{label: rows along one knob} of the method sweeps: CFG along w; rescale along φ at each w
  (from CFG's point at that w, φ = 0); CFG-Zero* along K at each (w, s* or not); APG along r at
  each (w, η, β)."""
  curves = {}
  cfg = {r['w']: r for r in rows if r['sweep'] == 'cfg'}
  for r in rows:
    s, w = r['settings'], r['w']
    if r['sweep'] == 'solvers':
      continue
    if r['sweep'] == 'cfg':
      key, start = 'CFG (along w)', None
    elif r['sweep'] == 'rescale':
      key, start = f'rescale w={w:g} (along φ)', cfg.get(w)
    elif r['sweep'] == 'cfg_zero_star':
      opt = s['zero_star_optimized_scale']
      key = f"CFG-Zero* w={w:g}{' s*' if opt else ''} (along K)"
      start = None if opt else cfg.get(w)
    elif r['sweep'] == 'cfg_pp':
      key, start = f"CFG++ {r['sampler']} {r['steps']} (along λ)", None
    elif r['sweep'] == 'autoguidance':
      key, start = 'autoguidance (along w)', None
    else:
      key = f"APG w={w:g} η={s['apg_eta']:g}" + (
          f" β={s['apg_momentum']:g}" if s['apg_momentum'] else '') + ' (along r)'
      start = None
    group = curves.setdefault(key, [start] if start is not None else [])
    group.append(r)
  for key, group in curves.items():  # rows come in measuring order; a curve runs along w
    if key.endswith(('(along w)', '(along λ)')):
      group.sort(key=lambda r: r['w'])
  return curves


def plot(rows, paths_):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import
  parts = [p for p in ('toy', 'fmnist') if any(r['part'] == p for r in rows)]

  def fd(r):
    return r['ed'] if r['part'] == 'toy' else r[r['primary']]['fd']

  def space(r, key):
    return r[key] if r['part'] == 'toy' else r[r['primary']][key]

  styles = {'cfg': ('k', 'o'), 'rescale': ('tab:blue', 's'), 'cfg_zero_star': ('tab:orange', '^'),
            'apg': ('tab:green', 'D'), 'cfg_pp': ('tab:purple', 'v'),
            'autoguidance': ('tab:brown', 'P')}
  fig, axes = plt.subplots(len(parts), 2, figsize=(10, 3.8 * len(parts)), squeeze=False)
  for row_axes, part in zip(axes, parts):
    curves = _curves([r for r in rows if r['part'] == part])
    if part == 'toy':
      curves = {k: g for k, g in curves.items()
                if k.endswith(('(along w)', '(along λ)')) or g[-1]['w'] == FLAGS.figure_toy_w}
    # The toy's classes are separated at t = 1: its class accuracy is 1 at every point, so its
    # fidelity axis is the mean exact log-density log p(x|y) of the samples instead.
    fidelity = 'log_p_x' if part == 'toy' else 'accuracy'
    for i, (label, group) in enumerate(curves.items()):
      method = group[-1]['guidance_method']
      line = '-' if label.startswith('CFG (') else ('--', ':', '-.')[i % 3]
      color, marker = styles.get(method, ('gray', 'x'))
      row_axes[0].plot([space(r, fidelity) for r in group], [fd(r) for r in group],
                       marker=marker, linestyle=line, color=color, label=label, ms=4)
      row_axes[1].plot([space(r, 'recall') for r in group], [space(r, 'precision') for r in group],
                       marker=marker, linestyle=line, color=color, label=label, ms=4)
    name = f'toy (methods at w = {FLAGS.figure_toy_w:g})' if part == 'toy' else f"Fashion-MNIST ({rows[-1].get('primary', '')})"
    row_axes[0].set_xlabel('mean log p(x|y) (fidelity)' if part == 'toy'
                           else 'class accuracy (fidelity)')
    row_axes[0].set_ylabel('energy distance to p(x|y)' if part == 'toy' else 'FD')
    row_axes[1].set_xlabel('recall (diversity)')
    row_axes[1].set_ylabel('precision (fidelity)')
    for ax in row_axes:
      ax.set_title(name, fontsize=9)
      ax.grid(alpha=0.3)
    row_axes[0].legend(fontsize=6, ncol=2)
  fig.suptitle('Guidance methods: fidelity against diversity (each curve along its knob)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(paths_[0], dpi=80)
  plt.close(fig)

  colors = {'euler': 'tab:blue', 'heun': 'tab:orange', 'dpmpp_2m': 'tab:green',
            'unipc': 'tab:red', 'euler_maruyama': 'tab:purple'}
  fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.6), squeeze=False)
  for ax, part in zip(axes[0], parts):
    group = [r for r in rows if r['part'] == part and r['sweep'] == 'solvers']
    # Heun at the reference w is also a CFG-sweep point (the reference sampler).
    w_solvers = {r['w'] for r in group}
    group += [r for r in rows if r['part'] == part and r['sweep'] == 'cfg'
              and r['w'] in w_solvers and not any(g['sampler'] == r['sampler']
                                                  and g['steps'] == r['steps'] for g in group)]
    for sampler in dict.fromkeys(r['sampler'] for r in group):
      pts = sorted((r['nfe'], fd(r)) for r in group if r['sampler'] == sampler)
      ax.plot(*zip(*pts), 'o-', label=sampler, ms=4, color=colors.get(sampler, 'gray'))
    ax.set_xscale('log')
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('NFE per sample')
    ax.set_ylabel('energy distance to p(x|y)' if part == 'toy' else 'FD')
    w = next(iter(w_solvers), None)
    ax.set_title(f"{'toy' if part == 'toy' else 'Fashion-MNIST'}: solvers at w = {w}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(paths_[1], dpi=80)
  plt.close(fig)


def main(argv):
  del argv
  if FLAGS.plot and len(FLAGS.plot) != 2:
    raise app.UsageError('--plot takes two PNG paths: curves.png,solvers.png')
  if FLAGS.replot:
    rows = [json.loads(line) for line in open(FLAGS.replot) if line.strip()]
  else:
    rows = []

    def emit(row):
      rows.append(row)
      print(json.dumps(row), flush=True)
      if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
          f.write(json.dumps(row) + '\n')

    sweeps = set(FLAGS.methods)
    if 'toy' in FLAGS.parts or FLAGS.smoke:
      points = [p for p in grid('toy', FLAGS.smoke) if p['sweep'] in sweeps]
      run_toy(points, 100 if FLAGS.smoke else FLAGS.toy_samples_per_class,
              4 if FLAGS.smoke else FLAGS.toy_steps, emit)
    if 'fmnist' in FLAGS.parts and not FLAGS.smoke and FLAGS.workdir:
      if FLAGS.config is None:
        raise app.UsageError('--workdir needs --config (the config it was trained with).')
      part = 'fmnist' if FLAGS.fmnist_grid == 'sweep' else f'fmnist_{FLAGS.fmnist_grid}'
      points = [p for p in grid(part) if p['sweep'] in sweeps]
      run_fmnist(FLAGS.config, FLAGS.workdir, points, FLAGS.samples_per_class, emit)
  print(table(rows))
  if FLAGS.plot:
    plot(rows, FLAGS.plot)
    print('wrote ' + ', '.join(FLAGS.plot))


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  app.run(main)
