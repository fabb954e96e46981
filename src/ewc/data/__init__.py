"""Data layer: IDX files, dataset sources, named datasets, a user's own data (a ``.npz`` file,
torch datasets) and continual-learning task sequences.

from ewc.data import load_dataset, make_sequence

ds = load_dataset("mnist-10k")            # embedded, no download
tasks = make_sequence(ds, "permuted", 5, seed=0)
tasks = make_sequence("my.npz", "split", 5)                  # x_train, y_train, x_test, y_test
tasks = make_sequence((train_set, test_set), "permuted", 5)  # torch.utils.data.Dataset items (x, y)
"""

from ewc.data.custom import from_torch, load_data, load_npz_data
from ewc.data.datasets import DATASETS, Dataset, DatasetSpec, load_dataset, register_dataset
from ewc.data.idx import check_pair, read_idx
from ewc.data.sequences import (
    SEQUENCES,
    check_sequence_data,
    check_task_count,
    make_sequence,
    patch_permutation,
    permute_patch,
)
from ewc.data.sources import ChecksumError, DataNotFoundError
from ewc.data.tasks import Task, TaskSequence, validation_tasks

__all__ = [
    "DATASETS",
    "SEQUENCES",
    "ChecksumError",
    "DataNotFoundError",
    "Dataset",
    "DatasetSpec",
    "Task",
    "TaskSequence",
    "check_pair",
    "check_sequence_data",
    "check_task_count",
    "from_torch",
    "load_data",
    "load_dataset",
    "validation_tasks",
    "load_npz_data",
    "make_sequence",
    "patch_permutation",
    "permute_patch",
    "read_idx",
    "register_dataset",
]
