"""Training: mesh and prefetch (mesh), optimizer (optim), the compiled step
(step), evaluation and loading for inference (evaluation), the loop (loop)
and masked-LM pretraining (pretrain). The names callers use are here."""

from genre_jax.train.evaluation import Evaluator
from genre_jax.train.evaluation import load_for_inference
from genre_jax.train.evaluation import padded_candidates
from genre_jax.train.evaluation import restore_params_from
from genre_jax.train.loop import dedup_capacity
from genre_jax.train.loop import hold_workdir
from genre_jax.train.loop import Progress
from genre_jax.train.loop import train_and_evaluate
from genre_jax.train.loop import validate_config
from genre_jax.train.mesh import abstract
from genre_jax.train.mesh import check_batch_size
from genre_jax.train.mesh import make_mesh
from genre_jax.train.mesh import maybe_initialize_distributed
from genre_jax.train.mesh import P
from genre_jax.train.mesh import prefetch_to_device
from genre_jax.train.mesh import to_global
from genre_jax.train.optim import make_optimizer
from genre_jax.train.optim import make_schedule
from genre_jax.train.optim import param_labels
from genre_jax.train.step import compile_train_step
from genre_jax.train.step import compute_loss
from genre_jax.train.step import init_model
from genre_jax.train.step import model_inputs
from genre_jax.train.step import Parts
from genre_jax.train.step import TrainingDivergedError
from genre_jax.train.step import train_step
