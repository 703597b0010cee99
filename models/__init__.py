"""Models for vitsparse: build timm ViTs, load weights, the built-in digits-vit, data and evaluation."""

from .cache import cache_dir
from .data import imagefolder_loader, model_data_config
from .digits import DigitsDatasets, DigitsLoaders, DigitsViTConfig, digits_datasets, digits_loaders
from .evaluate import EvalResult, evaluate
from .factory import build_model, list_builtin_models, register_builtin
from .pretrained import cached_weights_path, digits_vit
from .train import TrainMetrics, shifted_train_loader, train_digits_vit
from .weights import load_checkpoint, read_state_dict, save_state_dict

__all__ = [
    "DigitsDatasets",
    "DigitsLoaders",
    "DigitsViTConfig",
    "EvalResult",
    "TrainMetrics",
    "build_model",
    "cache_dir",
    "cached_weights_path",
    "digits_datasets",
    "digits_loaders",
    "digits_vit",
    "evaluate",
    "imagefolder_loader",
    "list_builtin_models",
    "load_checkpoint",
    "model_data_config",
    "read_state_dict",
    "register_builtin",
    "save_state_dict",
    "shifted_train_loader",
    "train_digits_vit",
]
