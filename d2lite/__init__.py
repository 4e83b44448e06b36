"""d2lite: batch normalization from scratch, and the helpers of the Batch Normalization chapter."""
from .budget import Budget, get_budget, is_grading
from .checks import assert_close, check_gradients, forbid_calls, numerical_gradient, rel_error
from .data import load_fashion_mnist, show_images, text_labels
from .experiments import Results, grid, run_grid
from .functional import batch_norm
from .models import count_parameters, lenet, mnist_net
from .modules import BatchNorm, convert_batchnorm
from .renorm import BatchRenorm, batch_renorm
from .syncbn import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from .distributed import grad_on_ranks, launch, map_ranks, train_distributed
from .history import History
from .plot import LivePlot, in_notebook_default as _in_notebook_default, plot_histories
from .train import accuracy, evaluate_accuracy, set_live_view as _set_live_view, train, try_gpu

# train() animates with d2lite.plot without importing it: the package wires the two together.
_set_live_view(LivePlot, _in_notebook_default)

__version__ = "0.1.0"

__all__ = ["Budget", "get_budget", "is_grading", "assert_close", "check_gradients",
           "numerical_gradient", "rel_error", "forbid_calls", "load_fashion_mnist", "show_images", "text_labels",
           "batch_norm", "count_parameters", "lenet", "mnist_net", "BatchNorm", "convert_batchnorm", "History",
           "accuracy", "evaluate_accuracy", "train", "try_gpu", "Results", "grid", "run_grid",
           "LivePlot", "plot_histories", "BatchRenorm", "batch_renorm", "SyncBatchNorm",
           "convert_sync_batchnorm", "sync_batch_norm", "grad_on_ranks", "launch", "map_ranks",
           "train_distributed"]
