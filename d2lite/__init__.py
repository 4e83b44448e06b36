"""d2lite: batch normalization from scratch, and the helpers of the Batch Normalization chapter."""
from .budget import Budget, get_budget, is_grading
from .checks import assert_close, check_gradients, forbid_calls, numerical_gradient, rel_error
from .data import load_fashion_mnist, show_images, text_labels
from .experiments import Results, grid, run_grid
from .functional import batch_norm
from .models import count_parameters, lenet
from .modules import BatchNorm, convert_batchnorm
from .plot import LivePlot, plot_histories
from .train import History, accuracy, evaluate_accuracy, train, try_gpu

__version__ = "0.1.0"

__all__ = ["Budget", "get_budget", "is_grading", "assert_close", "check_gradients",
           "numerical_gradient", "rel_error", "forbid_calls", "load_fashion_mnist", "show_images", "text_labels",
           "batch_norm", "count_parameters", "lenet", "BatchNorm", "convert_batchnorm", "History",
           "accuracy", "evaluate_accuracy", "train", "try_gpu", "Results", "grid", "run_grid",
           "LivePlot", "plot_histories"]
