"""CIFAR-10 / CIFAR-10.1 loading, validation splits and an on-device batch loader."""

from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, CLASSES, SPLITS, load_cifar10, train_val_split
from .cifar10_1 import CIFAR10_1_SIZES, cifar10_1_available, load_cifar10_1
from .download import download_url, file_md5, safe_extract_tar
from .loader import DeviceLoader
from .paths import DataError, DataNotAvailable, resolve_data_dir
from .test_sets import load_test_set, parse_test_set

__all__ = ["CIFAR10_1_SIZES", "CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "SPLITS", "DataError", "DataNotAvailable", "DeviceLoader"]
__all__ += ["cifar10_1_available", "download_url", "file_md5", "load_cifar10", "load_cifar10_1", "load_test_set", "parse_test_set"]
__all__ += ["resolve_data_dir", "safe_extract_tar", "train_val_split"]
