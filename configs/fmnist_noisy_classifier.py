"""The noise-aware Fashion-MNIST classifier p_t(y|x) of classifier guidance.

It classifies x_t = α_t z + β_t ε of the generator's path at any t ∈ [0, 1] (t = 0 noise,
t = 1 data); guidance adds w b_t ∇log p_t(y|x) to the generator's velocity. The path and the
time sampler must be the generator's (configs/fashion_mnist.py: 'linear', 'uniform').
About 7–8 minutes on a 2-core CPU (measured: 7.1 min on an Intel Xeon with AMX, 6.1 min of
training at 312 img/s and 48 s for the test accuracy of 10,000 test images × 10 time bins; the
AMD EPYC machines train at ~300 img/s and need ~80 s for the test accuracy).

Usage:
  python -m guidedflow.main --config configs/fmnist_noisy_classifier.py \
      --workdir runs/fmnist_noisy_classifier
  python -m guidedflow.main --config configs/fmnist_noisy_classifier.py \
      --workdir runs/fmnist_noisy_classifier --mode=evaluate

result.json reports the test accuracy in each of `eval.time_bins` time bins
(`accuracy_per_time_bin`) and the times where it reaches 50% and 90% (`t_accuracy_50`,
`t_accuracy_90`). Like every task it trains through the one training loop: an interrupted run
resumes from its last checkpoint exactly.
"""

from guidedflow.schema import noisy_classifier


def get_config():
  """Returns the noisy classifier config: its schema's defaults (every key and its meaning:
  guidedflow/schema/noisy_classifier.py)."""
  return noisy_classifier.get_config()
