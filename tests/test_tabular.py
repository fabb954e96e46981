"""ewc.data.tabular.load_table: a user's CSV / .npz stream, and its clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.data.tabular import load_table


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_columns_labels_time_order_and_tasks(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "s.csv",
        [
            "when,a,b,label,regime",
            "2024-01-01T00:00:03,3.0,30,cat,calm",
            "2024-01-01T00:00:01,1.0,10,dog,calm",
            "2024-01-01T00:00:02,2.0,20,cat,storm",
            "",  # blank lines are skipped
            "2024-01-01T00:00:04,4.0,40,bird,calm",
        ],
    )
    t = load_table(f, "label", timestamp_column="when", task_column="regime")
    assert t.features == ("a", "b")
    assert t.x.dtype == torch.float32 and t.x[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]  # sorted by time
    assert t.classes == ("bird", "cat", "dog") and t.y.tolist() == [2, 1, 1, 0]
    assert t.task == [0, 1, 0, 0] and t.task_names == ("calm", "storm")  # first seen after sorting
    assert t.reordered and t.n_dropped == 0
    assert np.all(np.diff(t.time) == 1.0)


def test_numeric_labels_sort_numerically_and_missing_features_are_dropped(tmp_path: Path) -> None:
    f = _write(tmp_path / "s.csv", ["x,y", "1,10", ",2", "nan,10", "inf,2", "3,2"])
    t = load_table(f, "y")
    assert t.classes == ("2", "10") and t.y.tolist() == [1, 0]
    assert t.n_dropped == 3 and t.x[:, 0].tolist() == [1.0, 3.0] and not t.reordered
    with pytest.raises(ValueError, match="row 2 has a missing or non-finite value in column 'x'"):
        load_table(f, "y", nan_policy="raise")


@pytest.mark.parametrize(
    ("lines", "kwargs", "message"),
    [
        (["a,b", "1,2"], {"label_column": "y"}, "no label column 'y'; the columns are a, b"),
        (["a,y", "1,0"], {"label_column": "y", "timestamp_column": "t"}, "no timestamp column 't'"),
        (["a,b,y", "1,x,0"], {"label_column": "y"}, "feature column 'b', row 1: 'x' is not a number"),
        (["a,a,y", "1,2,0"], {"label_column": "y"}, "duplicate column name"),
        (["a,y", "1,0,5"], {"label_column": "y"}, "data row 1 has 3 fields, the header has 2"),
        (["a,y"], {"label_column": "y"}, "no data rows"),
        (["y", "0"], {"label_column": "y"}, "no feature columns"),
        (["a,y", "1,"], {"label_column": "y"}, "label column 'y' is missing in row 1"),
        (["a,y,t", "1,0,yesterday"], {"label_column": "y", "timestamp_column": "t"}, "neither a number"),
        (["a,y", "1,0"], {"label_column": "y", "task_column": "y"}, "must be different columns"),
        (["a,y", "nan,0"], {"label_column": "y"}, "every row has a missing"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path: Path, lines: list[str], kwargs: dict, message: str) -> None:
    f = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_table(f, **kwargs)


def test_empty_binary_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty CSV file"):
        load_table(tmp_path / "empty.csv", "y")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not a UTF-8 text CSV"):
        load_table(tmp_path / "bin.csv", "y")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_table(tmp_path / "nope.csv", "y")
    with pytest.raises(ValueError, match="nan_policy"):
        load_table(tmp_path / "empty.csv", "y", nan_policy="ignore")


def test_npz_stream_and_its_errors(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)
    np.savez(tmp_path / "s.npz", x=x, label=np.array([1, 0, 1, 1]), t=np.array([4.0, 3.0, 2.0, 1.0]))
    t = load_table(tmp_path / "s.npz", "label", timestamp_column="t")
    assert t.x.shape == (4, 6) and t.x[0].tolist() == list(range(18, 24))  # flattened, time-sorted
    assert t.y.tolist() == [1, 1, 0, 1] and t.features[:2] == ("x0", "x1")
    with pytest.raises(ValueError, match="no label array 'y'; the arrays are label, t, x"):
        load_table(tmp_path / "s.npz", "y")
    np.savez(tmp_path / "short.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(ValueError, match="one entry per row of x"):
        load_table(tmp_path / "short.npz", "y")
    np.savez(tmp_path / "nox.npz", X=x, y=np.zeros(4))
    with pytest.raises(ValueError, match="no feature array 'x'"):
        load_table(tmp_path / "nox.npz", "y")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_table(tmp_path / "cut.npz", "label")
