"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to a sweep's final losses.

Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2) with the
corrections of Besiroglu et al. 2024 ("Chinchilla Scaling: A replication
attempt"):

  * The parameters are (a, b, e, alpha, beta) with A = exp(a), B = exp(b),
    E = exp(e), so the model's log-loss is
    LSE(a - alpha log N, b - beta log D, e), and the objective is the Huber
    loss (delta 1e-3) of its residual against the measured log-loss, summed
    over the points. A Huber loss with so small a delta is nearly an L1 fit:
    one odd run moves the law little.
  * L-BFGS-B (SciPy) is started from every point of Chinchilla's grid of
    initialisations (alpha, beta in 0..2 step 0.5; e in -1..1.5 step 0.5;
    a, b in 0..25 step 5) and the best optimum is kept.
  * Besiroglu et al. found the published fit stopped early: with residuals of
    ~1e-2 the objective is ~1e-5, below L-BFGS's default *absolute* change
    tolerance (its ftol is relative to max(|f|, 1)), so the optimiser quits
    near its start. Here ftol is 1e-15 * f's own scale and gtol 1e-12, with
    up to 10,000 iterations; the parameters are reported at full precision
    (they also found the paper's rounded values did not reproduce its law).
  * Confidence intervals come from a bootstrap: the points are resampled
    with replacement `bootstrap` times and the law refitted each time (from
    the full fit's optimum and a sample of the grid); the 2.5 and 97.5
    percentiles of each quantity are its 95% interval. (Chinchilla's own
    intervals were implausibly narrow for 400 runs; Besiroglu et al.'s
    bootstrap is what this follows.)

The compute-optimal frontier under C = 6 N D minimises the law on N D = C/6:
N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G with G = (alpha A / (beta B))^(1/(alpha+beta)),
a = beta / (alpha + beta), b = alpha / (alpha + beta).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import numpy as np
from scipy import optimize

# Iterations of the scouting run every initialisation gets (see _best_fit).
SCOUT_ITERATIONS = 10

PARAM_NAMES = ('log_A', 'log_B', 'log_E', 'alpha', 'beta')

# The published laws the README compares with.
PUBLISHED = {
    'chinchilla': {'source': 'Hoffmann et al. 2022 (approach 3; approaches 1-2 gave a ~ b ~ 0.5)',
                   'alpha': 0.34, 'beta': 0.28, 'E': 1.69, 'A': 406.4, 'B': 410.7,
                   'a': 0.46, 'b': 0.54},
    'besiroglu_2024': {'source': 'Besiroglu et al. 2024, replication of approach 3',
                       'alpha': 0.3478, 'beta': 0.3658, 'E': 1.8172, 'A': 482.01,
                       'B': 2085.43, 'a': 0.513, 'b': 0.487},
}

# Chinchilla's grid of initialisations (with e up to 1.5: losses of small models are higher).
INIT_GRID = {
    'alpha': (0.0, 0.5, 1.0, 1.5, 2.0),
    'beta': (0.0, 0.5, 1.0, 1.5, 2.0),
    'log_E': (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    'log_A': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    'log_B': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


def init_grid() -> np.ndarray:
  """Every initialisation as rows of (log_A, log_B, log_E, alpha, beta)."""
  rows = itertools.product(INIT_GRID['log_A'], INIT_GRID['log_B'], INIT_GRID['log_E'],
                           INIT_GRID['alpha'], INIT_GRID['beta'])
  return np.array(list(rows), dtype=np.float64)


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
  a, b, e, alpha, beta = theta
  return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                    log_loss: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
  """The summed Huber loss of log-space residuals, and its gradient in theta."""
  terms = _terms(theta, log_n, log_d)
  # logsumexp and its softmax weights by hand: scipy.special's versions cost ~10x more
  # per call on these few points, and the fit makes hundreds of thousands of calls.
  top = terms.max(axis=0)
  exps = np.exp(terms - top)
  total = exps.sum(axis=0)
  residual = top + np.log(total) - log_loss
  small = np.abs(residual) <= delta
  value = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta)).sum()
  slope = np.clip(residual, -delta, delta)      # d huber / d residual
  weights = exps * (slope / total)              # d huber / d term
  grad = np.array([
      weights[0].sum(),
      weights[1].sum(),
      weights[2].sum(),
      -(weights[0] * log_n).sum(),
      -(weights[1] * log_d).sum(),
  ])
  return float(value), grad


def _minimize(start: np.ndarray, args: tuple, strict: bool) -> optimize.OptimizeResult:
  """L-BFGS-B from `start`: a short scouting run, or (strict) run to real convergence.

  ftol is relative to max(|f|, 1): with f ~ 1e-5 the default 2.2e-9 stops near the
  start (module docstring), so the strict run sets it far below the objective's scale.
  """
  if strict:
    options = {'ftol': 1e-15 * args[-1] ** 2, 'gtol': 1e-12, 'maxiter': 10_000,
               'maxfun': 20_000, 'maxls': 50}
  else:
    options = {'maxiter': SCOUT_ITERATIONS}
  return optimize.minimize(huber_objective, start, args=args, jac=True, method='L-BFGS-B',
                           options=options)


def _best_fit(starts: np.ndarray, log_n, log_d, log_loss, delta,
              polish: int = 8) -> tuple[np.ndarray, float, int]:
  """(theta, objective, starts that reached it) over the given initialisations.

  Every start gets a short scouting run; the `polish` best are then run to
  convergence with the strict tolerances and the best of those is the fit.
  (Running all ~5,400 starts to convergence costs ~10x more and, on the
  sweeps and synthetic laws tried, found the same optimum.)
  """
  args = (log_n, log_d, log_loss, delta)
  scouted = []
  for start in starts:
    result = _minimize(start, args, strict=False)
    if np.all(np.isfinite(result.x)) and math.isfinite(float(result.fun)):
      scouted.append((float(result.fun), np.array(result.x)))
  if not scouted:
    raise RuntimeError('No initialisation of the fit reached a finite objective.')
  scouted.sort(key=lambda item: item[0])
  best_theta, best_value, values = None, math.inf, []
  for _, theta in scouted[:polish]:
    result = _minimize(theta, args, strict=True)
    value = float(result.fun)
    if not np.all(np.isfinite(result.x)) or not math.isfinite(value):
      continue
    values.append(value)
    if value < best_value:
      best_theta, best_value = np.array(result.x), value
  if best_theta is None:
    raise RuntimeError('No initialisation of the fit converged to a finite optimum.')
  # How many scouted starts were already within 1% of the optimum's objective.
  reached = sum(1 for value, _ in scouted if value <= best_value * 1.01 + 1e-18)
  return best_theta, best_value, reached


def predict_theta(theta: np.ndarray, n: Any, d: Any) -> np.ndarray:
  a, b, e, alpha, beta = np.asarray(theta, np.float64)
  return np.exp(e) + np.exp(a) * np.asarray(n, np.float64) ** -alpha + np.exp(b) * np.asarray(
      d, np.float64) ** -beta


def frontier_exponents(theta: np.ndarray) -> dict[str, float]:
  """a, b and G of N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G."""
  log_a, log_b, _, alpha, beta = np.asarray(theta, np.float64)
  total = alpha + beta
  log_g = (math.log(alpha) + log_a - math.log(beta) - log_b) / total if alpha > 0 and beta > 0 \
      else math.nan
  return {'a': beta / total, 'b': alpha / total, 'G': math.exp(log_g)}


@dataclasses.dataclass
class Fit:
  """A fitted law; `samples` are the bootstrap fits' (log_A, log_B, log_E, alpha, beta)."""
  theta: np.ndarray
  objective: float
  num_points: int
  num_inits: int
  inits_at_optimum: int
  delta: float
  samples: np.ndarray   # (num_bootstrap, 5); empty without a bootstrap

  @property
  def alpha(self) -> float:
    return float(self.theta[3])

  @property
  def beta(self) -> float:
    return float(self.theta[4])

  @property
  def E(self) -> float:  # pylint: disable=invalid-name
    return float(math.exp(self.theta[2]))

  def predict(self, n: float, d: float) -> float:
    return float(predict_theta(self.theta, n, d))

  def predict_interval(self, n: float, d: float) -> tuple[float, float]:
    """The 95% bootstrap interval of the predicted loss (the point value if no bootstrap)."""
    if not len(self.samples):
      value = self.predict(n, d)
      return value, value
    values = np.array([predict_theta(t, n, d) for t in self.samples])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)

  def _quantities(self, theta: np.ndarray) -> dict[str, float]:
    exps = frontier_exponents(theta)
    return {'alpha': float(theta[3]), 'beta': float(theta[4]), 'E': float(np.exp(theta[2])),
            'A': float(np.exp(theta[0])), 'B': float(np.exp(theta[1])), 'a': exps['a'],
            'b': exps['b']}

  def params_dict(self) -> dict[str, float]:
    return self._quantities(self.theta)

  def intervals(self) -> dict[str, list[float]]:
    """The 95% percentile interval of each quantity over the bootstrap fits."""
    if not len(self.samples):
      return {}
    rows = [self._quantities(t) for t in self.samples]
    out = {}
    for key in rows[0]:
      values = np.array([r[key] for r in rows])
      values = values[np.isfinite(values)]
      out[key] = [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else []
    return out

  def frontier(self, c_min: float, c_max: float, num: int = 6) -> dict[str, Any]:
    exps = frontier_exponents(self.theta)
    table = []
    for c in np.geomspace(c_min, c_max, num):
      n = exps['G'] * (c / 6.0) ** exps['a']
      d = (c / 6.0) ** exps['b'] / exps['G']
      table.append({'compute': float(c), 'params': float(n), 'tokens': float(d),
                    'tokens_per_param': float(d / n), 'loss': self.predict(n, d)})
    intervals = self.intervals()
    return {'a': exps['a'], 'b': exps['b'], 'G': exps['G'],
            'a_interval_95': intervals.get('a'), 'b_interval_95': intervals.get('b'),
            'rule': 'N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G, C = 6 N D (N non-embedding)',
            'table': table}

  def to_dict(self) -> dict[str, Any]:
    return {'params': self.params_dict(), 'theta': dict(zip(PARAM_NAMES, map(float, self.theta))),
            'interval_95': self.intervals(), 'bootstrap': int(len(self.samples)),
            'objective': self.objective, 'huber_delta': self.delta, 'num_points': self.num_points,
            'num_inits': self.num_inits, 'inits_at_optimum': self.inits_at_optimum}

  def describe(self) -> str:
    iv = self.intervals()
    def fmt(key: str, value: float) -> str:
      return f'{key} {value:.4f}' + (f' [{iv[key][0]:.4f}, {iv[key][1]:.4f}]' if iv.get(key) else '')
    q = self.params_dict()
    return ', '.join(fmt(k, q[k]) for k in ('alpha', 'beta', 'E', 'a', 'b'))


def fit_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
            delta: float = 1e-3, bootstrap: int = 0, seed: int = 0,
            init_stride: int = 1, bootstrap_inits: int = 8) -> Fit:
  """Fits the law to points (N, D, loss); `bootstrap` resamples give the intervals.

  init_stride: start from every k-th initialisation of the grid (1: all 5,400;
  a larger stride trades thoroughness for time, e.g. in tests).
  """
  log_n = np.log(np.asarray(params, np.float64))
  log_d = np.log(np.asarray(tokens, np.float64))
  log_loss = np.log(np.asarray(losses, np.float64))
  if not (len(log_n) == len(log_d) == len(log_loss)) or len(log_n) < 5:
    raise ValueError(f'The fit needs at least 5 points of (N, D, loss); got {len(log_n)}.')
  grid = init_grid()[::max(1, int(init_stride))]
  theta, value, reached = _best_fit(grid, log_n, log_d, log_loss, delta)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    index = rng.integers(0, len(log_n), len(log_n))
    starts = np.concatenate([theta[None], grid[rng.choice(len(grid), min(bootstrap_inits, len(grid)),
                                                          replace=False)]])
    sample, _, _ = _best_fit(starts, log_n[index], log_d[index], log_loss[index], delta,
                             polish=2)
    samples.append(sample)
  return Fit(theta=theta, objective=value, num_points=len(log_n), num_inits=len(grid),
             inits_at_optimum=reached, delta=delta,
             samples=np.array(samples).reshape(-1, 5))
