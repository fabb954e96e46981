"""Data layer: IDX files, dataset sources, named datasets and continual-learning task sequences.

from ewc.data import load_dataset, make_sequence

ds = load_dataset("mnist-10k")            # embedded, no download
tasks = make_sequence(ds, "permuted", 5, seed=0)
"""

from ewc.data.datasets import DATASETS, Dataset, DatasetSpec, load_dataset, register_dataset
from ewc.data.idx import check_pair, read_idx
from ewc.data.sequences import SEQUENCES, check_task_count, make_sequence, patch_permutation, permute_patch
from ewc.data.sources import ChecksumError, DataNotFoundError
from ewc.data.tasks import Task, TaskSequence

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
    "check_task_count",
    "load_dataset",
    "make_sequence",
    "patch_permutation",
    "permute_patch",
    "read_idx",
    "register_dataset",
]
