"""A researcher's own model (``--model NAME | MODULE:FACTORY``, any factory in Python) and own data
(``--data FILE.npz``, torch datasets in Python), end to end through the command line.

The data are made here: images with a class-coloured band ([N, 3, 32, 32] uint8), Gaussian blobs
([N, 20] float32) and token ids ([N, 12] int64), small enough that every run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.checkpoint import load_checkpoint
from ewc.cli import main
from ewc.data import from_torch, load_npz_data, make_sequence
from ewc.data.custom import inspect_npz
from ewc.experiments.sequence import RunConfig, run_sequence
from ewc.models import model_name
from ewc.train import TrainConfig, run_method

TESTS = Path(__file__).resolve().parent

TINY = [
    *("--tasks", "2", "--epochs", "3", "--batch-size", "20", "--lr", "0.01", "--eval-every", "5"),
    *("--curve-samples", "20", "--fisher-samples", "40", "--threads", "1", "--quiet"),
]


def rgb(n: int, classes: int = 4, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[n, 3, size, size] uint8 noise with a bright band whose channel and rows give the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 80, (n, 3, size, size), dtype=np.uint8)
    band = size // classes
    for c in range(classes):
        x[y == c, c % 3, band * c : band * (c + 1), :] += 150
    return x, y.astype(np.int64)


def blobs(n: int, classes: int = 4, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] float32 Gaussian blobs, one centre per class (the same centres for every seed)."""
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 2.0
    y = np.arange(n) % classes
    x = centres[y] + np.random.default_rng(seed).normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def write_npz(path: Path, make, sizes=(160, 80), **extra) -> Path:
    x_train, y_train = make(sizes[0], seed=1)
    x_test, y_test = make(sizes[1], seed=2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch):
    """sys.path and the imported helper modules as they were after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("tests_helpers", "my_nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return monkeypatch


# ---- the built-in models on the command line


@pytest.mark.parametrize(("sequence", "model", "size"), [("split", "cnn", 32), ("permuted", "resnet18", 16)])
def test_run_a_conv_model_on_rgb_npz(sequence: str, model: str, size: int, tmp_path: Path) -> None:
    data = write_npz(tmp_path / "rgb.npz", lambda n, seed: rgb(n, seed=seed, size=size))
    out = tmp_path / "out"
    argv = ["run", sequence, "--data", str(data), "--model", model, "--methods", "sgd,ewc", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    res = results(out)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    assert res["config"]["data"] == {
        "path": str(data.resolve()),
        "sha256": sha,
        "input_shape": [3, size, size],
        "dtype": "uint8",
        "num_classes": 4,
        "sizes": {"train": 160, "test": 80},
    }
    assert res["config"]["model"] == model
    for r in res["methods"].values():
        assert r["architecture"]["model"] == model and r["architecture"]["input_shape"] == [3, size, size]
        assert r["accuracy_matrix"][0][0] > 0.75  # the band is easy: learned, far above chance (<= 0.5)
    assert json.loads((out / "run.json").read_text())["settings"]["data_sha256"] == sha
    title = f"# Continual-learning report (rgb.npz, {sequence}, 2 tasks, model {model})"
    assert (out / "report.md").read_text().startswith(title)


def test_run_permuted_cnn_on_mnist10k(tmp_path: Path) -> None:
    """The acceptance command on the embedded data (subsampled training parts)."""
    out = tmp_path / "out"
    argv = ["run", "permuted", "--model", "cnn", "--methods", "sgd", "--max-train-per-task", "100", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    res = results(out)
    assert res["config"]["data"] == {
        "name": "mnist-10k",
        "input_shape": [28, 28],
        "dtype": "uint8",
        "num_classes": 10,
    }
    assert res["methods"]["sgd"]["architecture"]["input_shape"] == [1, 28, 28]


# ---- a user's model, MODULE:FACTORY from sys.path or the working directory


def test_model_module_factory_from_sys_path_saves_and_reloads(clean_imports, tmp_path: Path) -> None:
    clean_imports.syspath_prepend(str(TESTS))
    data = write_npz(tmp_path / "tab.npz", blobs)
    out = tmp_path / "out"
    argv = ["run", "permuted", "--data", str(data), "--model", "tests_helpers:make_net", "--methods", "ewc"]
    assert main([*argv, *TINY, "--save-state", "--out", str(out)]) == 0
    res = results(out)
    arch = res["methods"]["ewc"]["architecture"]
    assert arch["model"] == "tests_helpers:make_net" and arch["input_shape"] == [20]
    assert res["methods"]["ewc"]["accuracy_matrix"][0][0] > 0.8  # blobs: easy
    model, _, _ = load_checkpoint(out / "checkpoints" / "ewc.pt")  # rebuilt by importing the factory
    assert [tuple(p.shape) for p in model.parameters()] == [(24, 20), (24,), (4, 24), (4,)]


def test_model_module_factory_from_the_working_directory(clean_imports, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_nets.py").write_text(
        "import torch\n\ndef linear(input_shape, num_outputs):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, num_outputs))\n"
    )
    data = write_npz(work / "tab.npz", blobs)
    clean_imports.chdir(work)
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # (restored after): cwd not on the path
    assert str(work) not in sys.path
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "split",
                "--data",
                "tab.npz",
                "--model",
                "my_nets:linear",
                "--methods",
                "sgd",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert results(out)["config"]["data"]["path"] == str(data)
    assert sys.path[-1] == str(work)  # the working directory was searched after everything else


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no_such_module:net", "cannot import module 'no_such_module'"),
        ("tests_helpers:nothing", "has no attribute 'nothing'"),
        ("tests_helpers:wrong_width", r"must return logits \[N, 4\]"),
        ("tests_helpers:not_a_module", "returned int, not a torch.nn.Module"),
        ("cnn", r"takes images.*\(20,\)"),
        ("tests_helpers", "model must be one of mlp, cnn, resnet18"),
    ],
)
def test_bad_models_are_one_line_before_out_is_made(
    clean_imports, tmp_path: Path, capsys: pytest.CaptureFixture, model: str, message: str
) -> None:
    clean_imports.syspath_prepend(str(TESTS))
    data = write_npz(tmp_path / "tab.npz", blobs)
    out = tmp_path / "out"
    assert main(["run", "permuted", "--data", str(data), "--model", model, *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ewc: error: ")
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def test_model_settings_it_does_not_take_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"model 'cnn' does not take hidden \(of the architecture settings it takes: batchnorm, dropout",
    ):
        TrainConfig(model="cnn", hidden=(100,))
    with pytest.raises(ValueError, match="model 'resnet18' does not take dropout"):
        TrainConfig(model="resnet18", dropout=0.5)
    TrainConfig(model="cnn", dropout=0.5)  # cnn takes dropout
    config = TrainConfig(model="resnet18", threads=1, progress=False)
    with pytest.raises(
        ValueError, match="dropout: trains a network with dropout, and model 'resnet18' takes no"
    ):
        run_sequence("split", "mnist-10k", 2, ["sgd", "dropout"], config)


# ---- a user's data: .npz files, good and bad


def test_tabular_npz_permutes_features_and_refuses_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_npz(tmp_path / "tab.npz", blobs)
    tasks = make_sequence(str(data), "permuted", 2, seed=3)
    t0, t1 = tasks[0], tasks[1]
    assert t0.x_train.dtype == torch.float32 and t0.x_train.shape == (144, 20)  # 10% held out
    perm = np.asarray(t1.transform["permutation"])
    assert sorted(perm) == list(range(20)) and not (perm == np.arange(20)).all()
    assert torch.equal(t1.x_train, t0.x_train[:, perm])
    ds = load_npz_data(data)
    assert torch.equal(t0.x_test, torch.from_numpy(np.array(ds.x_test)))  # float features as they are
    with pytest.raises(ValueError, match=r"rotated tasks need images.*shape \(20,\), dtype float32"):
        make_sequence(str(data), "rotated", 2)
    out = tmp_path / "out"
    assert main(["run", "rotated", "--data", str(data), *TINY, "--out", str(out)]) == 2
    assert "rotated tasks need images" in capsys.readouterr().err and not out.exists()


def test_rgb_permutation_moves_pixels_with_their_colours(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "rgb.npz", rgb)
    t0, t1 = make_sequence(str(data), "permuted", 2, max_train_per_task=10)
    perm = torch.as_tensor(t1.transform["permutation"])
    assert len(perm) == 32 * 32 and t0.x_train.shape == (10, 3, 32, 32)
    assert float(t0.x_train.max()) <= 1.0 and float(t0.x_train.max()) > 0.8  # uint8 scaled to [0, 1]
    assert torch.equal(t1.x_train, t0.x_train.flatten(2)[:, :, perm].reshape(10, 3, 32, 32))


def test_rotated_float_images_keep_their_range(tmp_path: Path) -> None:
    x, y = rgb(40)
    x = x.astype(np.float32) / 127.5 - 1.0  # in [-1, 1]
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    t = make_sequence(str(path), "rotated", 2, angles=[0.0, 90.0])
    assert float(t[1].x_train.min()) < -0.5  # not clamped to [0, 1]
    torch.testing.assert_close(t[1].x_train, torch.rot90(t[0].x_train, 1, (2, 3)), rtol=0, atol=1e-5)


def test_own_validation_split_is_used(tmp_path: Path) -> None:
    x_val, y_val = blobs(12, seed=5)
    data = write_npz(tmp_path / "v.npz", blobs, x_val=x_val, y_val=y_val)
    t = make_sequence(str(data), "split", 2)[1]
    assert t.classes == (2, 3) and torch.equal(t.x_val, torch.from_numpy(x_val[np.isin(y_val, [2, 3])]))
    assert len(t.y_train) == 80  # every training row of classes 2 and 3: none held out
    assert inspect_npz(data).sizes == {"train": 160, "val": 12, "test": 80}


def _bad(tmp_path: Path, **changes) -> Path:
    x, y = blobs(16)
    arrays = {"x_train": x, "y_train": y, "x_test": x[:8], "y_test": y[:8], **changes}
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"y_test": None}, r"missing array\(s\) y_test \(the file has: x_test, x_train, y_train\)"),
        ({"x_test": np.zeros((8, 21), np.float32)}, r"x_test has samples of shape \(21,\), x_train \(20,\)"),
        ({"x_test": np.zeros((8, 20), np.float64)}, "x_test is float64, x_train float32"),
        ({"y_train": np.zeros(15, np.int64)}, "x_train has 16 rows but y_train has 15 labels"),
        ({"y_train": np.zeros(16, np.float32)}, "y_train must be 1-D integer class labels, got float32"),
        ({"y_test": -np.ones(8, np.int64)}, "y_test has negative labels"),
        ({"x_val": np.zeros((2, 20), np.float32)}, "x_val, y_val but not the other"),
        ({"x_train": np.array(["a"] * 16)}, "x_train must be a numeric array"),
    ],
)
def test_bad_npz_files_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict, message: str
) -> None:
    path = _bad(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        inspect_npz(path)
    out = tmp_path / "out"
    assert main(["run", "permuted", "--data", str(path), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and not out.exists()


def test_unreadable_missing_and_nan_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        inspect_npz(junk)
    assert main(["run", "permuted", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "no such data file" in capsys.readouterr().err
    x, y = blobs(16)
    x[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"\(train\): inputs hold NaN or infinite values"):
        load_npz_data(_bad(tmp_path, x_train=x))


def test_a_changed_data_file_is_another_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_npz(tmp_path / "tab.npz", blobs)
    out = tmp_path / "out"
    argv = ["run", "split", "--data", str(data), "--methods", "sgd", *TINY, "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0 and "resuming" in capsys.readouterr().err  # the same file: resumed, done
    write_npz(data, blobs, sizes=(120, 80))
    assert main(argv) == 2
    assert "data_sha256" in capsys.readouterr().err


# ---- the Python API: torch datasets and any factory


def _token_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Token ids [n, 12] in 0..49; class c draws from the ids 10c .. 10c + 19 (overlapping)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 10 * y[:, None] + torch.randint(0, 20, (n, 12), generator=g)
    return torch.utils.data.TensorDataset(x.clamp_(max=49), y)


def test_torch_datasets_and_a_factory_object(clean_imports) -> None:
    clean_imports.syspath_prepend(str(TESTS))
    import tests_helpers

    ds = from_torch(_token_data(120, 0), _token_data(40, 1), name="tokens")
    assert ds.x_train.dtype == np.int64 and ds.image_shape == (12,) and ds.num_classes == 4
    assert not ds.is_image
    tasks = make_sequence((_token_data(120, 0), _token_data(40, 1)), "permuted", 2)
    assert tasks[1].x_train.dtype == torch.int64  # token ids stay ids; their positions are permuted
    config = TrainConfig(
        model=tests_helpers.TokenNet, epochs=4, batch_size=16, lr=0.02, threads=1, progress=False
    )
    assert config.to_dict()["model"] == "tests_helpers:TokenNet" == model_name(tests_helpers.TokenNet)
    res = run_method(tasks, "ewc", config)
    assert res["architecture"]["model"] == "tests_helpers:TokenNet"
    assert res["accuracy_matrix"][0][0] > 0.6  # the ids tell the class: learned (chance 0.25)


def test_from_torch_refuses_mixed_items() -> None:
    good = [(torch.zeros(3), 1), (torch.zeros(3), 0)]
    with pytest.raises(ValueError, match=r"t train\[1\]: input float32 \(4,\), item 0's float32 \(3,\)"):
        from_torch([good[0], (torch.zeros(4), 0)], good, name="t")
    with pytest.raises(ValueError, match=r"t test\[0\]: the label must be one integer class index"):
        from_torch(good, [(torch.zeros(3), 0.5)], name="t")


def test_a_factory_that_workers_cannot_import_is_refused(tmp_path: Path) -> None:
    def local(input_shape, num_outputs):  # no import path
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_outputs))

    config = TrainConfig(model=local, epochs=1, threads=1, progress=False)
    with pytest.raises(ValueError, match="cannot be imported by name, which --jobs 2 workers need"):
        run_sequence("split", "mnist-10k", 2, ["sgd"], config, jobs=2)


def test_run_config_checks_data_and_model_together(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "tab.npz", blobs)
    RunConfig(sequence="split", data=str(data), tasks=2)
    with pytest.raises(ValueError, match="tasks must be at most 2 for a split sequence"):
        RunConfig(sequence="split", data=str(data), tasks=3)
    with pytest.raises(ValueError, match=r"model 'resnet18' takes images"):
        RunConfig(sequence="permuted", data=str(data), train=TrainConfig(model="resnet18"))
    state = torch.get_rng_state()
    RunConfig(sequence="permuted", train=TrainConfig(model="resnet18"))  # mnist-10k: builds
    assert torch.equal(torch.get_rng_state(), state)  # the check drew no random numbers
