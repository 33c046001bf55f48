"""Expert and data parallelism, applied to the single-process model from one place."""

from moetrain.parallel.grads import accumulating, clip_grad_norm_, finalize_grads
from moetrain.parallel.mesh import build_mesh, init_distributed
from moetrain.parallel.parallelize import all_reduce_sum, parallelize

__all__ = ["accumulating", "build_mesh", "init_distributed", "parallelize", "finalize_grads",
           "clip_grad_norm_", "all_reduce_sum"]
