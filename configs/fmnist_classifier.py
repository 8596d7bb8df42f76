"""The Fashion-MNIST feature network: a small CNN classifier trained by guidedflow itself.

Its penultimate activations are the features for FD and precision/recall of generated samples,
and its logits give their class accuracy (guidedflow/tasks/classifier.py). A few minutes on a
2-core CPU (about 3 minutes, ~92% test accuracy).

Usage:
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier \
      --mode=evaluate

It trains through the one training loop like every task: an interrupted run (Ctrl-C, SIGTERM)
resumes from its last checkpoint exactly; running the command again on a finished workdir trains
no further and measures the test accuracy again.
"""

from guidedflow.schema import classifier


def get_config():
  """Returns the classifier config: its schema's defaults (every key and its meaning:
  guidedflow/schema/classifier.py)."""
  return classifier.get_config()
