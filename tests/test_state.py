"""Persistence: atomic saves, code-free loads, and EWC / L2 state round trips."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ewc.state as state_module
from ewc import EWC, L2
from ewc.penalty import FORMAT
from ewc.state import atomic_save, safe_load

torch.set_num_threads(1)


def _write_marker(path: str) -> str:
    Path(path).write_text("code ran")
    return "boom"


class Payload:
    """Unpickling this object calls ``_write_marker``: a stand-in for ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def model_with_seed(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------ atomic_save


def test_atomic_save_round_trip_and_permissions(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    obj = {"w": torch.arange(6.0).view(2, 3), "meta": {"n": 3, "tags": ["a", "b"]}}
    atomic_save(obj, target)
    loaded = safe_load(target)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["meta"] == obj["meta"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(target, 0o640)
    atomic_save({"w": torch.zeros(1)}, target)  # overwriting keeps the existing mode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert torch.equal(safe_load(target)["w"], torch.zeros(1))
    assert leftovers(tmp_path, {"ckpt.pt"}) == []


def test_atomic_save_fsyncs_the_file_and_the_directory(tmp_path: Path, monkeypatch) -> None:
    kinds = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert kinds == ["file", "dir"]


def test_failing_torch_save_leaves_the_old_file_intact(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ckpt.pt"
    atomic_save({"version": 1, "w": torch.ones(3)}, target)
    old_bytes = target.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(40)  # a partial file on disk, then the crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(state_module.torch, "save", half_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"version": 2, "w": torch.zeros(3)}, target)
    assert target.read_bytes() == old_bytes
    assert leftovers(tmp_path, {"ckpt.pt"}) == []  # the temporary file is gone
    monkeypatch.undo()
    assert safe_load(target)["version"] == 1


def test_failing_replace_leaves_the_old_file_intact(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ckpt.pt"
    atomic_save({"version": 1}, target)
    old_bytes = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_save({"version": 2}, target)
    assert target.read_bytes() == old_bytes
    assert leftovers(tmp_path, {"ckpt.pt"}) == []


def test_interrupted_save_is_cleaned_up_too(tmp_path: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": 1}, tmp_path / "new.pt")
    assert leftovers(tmp_path, set()) == []


# -------------------------------------------------------------------------------- safe_load


def test_missing_file_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        safe_load(path)


@pytest.mark.parametrize("keep", [0, 1, 16, 0.5, -1])
def test_truncated_file_is_reported_as_corrupt(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.randn(64), "n": 1}, path)
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep % len(data))
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"ckpt\.pt.*corrupt or truncated"):
        safe_load(path)


def test_garbage_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"junk\.pt.*corrupt or truncated"):
        safe_load(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-5"])
def test_pickles_that_run_code_are_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(Payload(marker), fh, protocol=int(writer[-1]))
    with pytest.raises(ValueError, match=r"refused.*code execution.*_write_marker"):
        safe_load(path)
    assert not marker.exists()
    # The payload is live: an unsafe load really runs it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.read_text() == "code ran"


# ------------------------------------------------------------------- EWC / L2 persistence


def consolidated(cls: type, mode: str, seed: int = 0, tasks: int = 3) -> EWC | L2:
    model = model_with_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    reg = cls(model, lam=12.5, mode=mode, gamma=0.8)
    for _ in range(tasks):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if cls is EWC:
            reg.consolidate(
                fisher_diag={n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
            )
        else:
            reg.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return reg


def assert_plain(obj: object) -> None:
    """Only dicts, lists, tensors and primitives: safe for weights_only loading."""
    if isinstance(obj, dict):
        assert type(obj) is dict
        for k, v in obj.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_plain(v)
    else:
        assert type(obj) in (Tensor, int, float, str, bool, type(None)), type(obj)
        if isinstance(obj, Tensor):
            assert not obj.requires_grad


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert (a["format"], a["class"], a["config"], a["num_tasks"]) == (
        b["format"],
        b["class"],
        b["config"],
        b["num_tasks"],
    )
    assert len(a["tasks"]) == len(b["tasks"])
    for ta, tb in zip(a["tasks"], b["tasks"], strict=True):
        for part in ("anchor", "fisher"):
            assert ta[part].keys() == tb[part].keys()
            for n in ta[part]:
                assert torch.equal(ta[part][n], tb[part][n]), (part, n)


@pytest.mark.parametrize("cls", [EWC, L2])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_save_load_round_trip(tmp_path: Path, cls: type, mode: str) -> None:
    reg = consolidated(cls, mode)
    state = reg.state_dict()
    assert state["format"] == FORMAT and state["class"] == cls.__name__
    assert len(state["tasks"]) == (3 if mode == "separate" else 1) and state["num_tasks"] == 3
    assert_plain(state)
    path = tmp_path / "reg.pt"
    reg.save(path)
    model2 = model_with_seed(99)
    model2.load_state_dict(reg.model.state_dict())
    loaded = cls.load(path, model2)
    assert type(loaded) is cls and loaded.model is model2
    assert (loaded.lam, loaded.mode, loaded.gamma, loaded.num_tasks) == (12.5, mode, 0.8, 3)
    assert_states_equal(loaded.state_dict(), state)
    assert loaded.penalty().item() == reg.penalty().item() > 0


def test_load_state_dict_restores_config_and_copies_tensors() -> None:
    reg = consolidated(EWC, "online")
    state = {
        **reg.state_dict(),
        "tasks": [{k: {n: t.clone() for n, t in d.items()} for k, d in reg.state_dict()["tasks"][0].items()}],
    }
    other = EWC(reg.model, lam=1.0, gamma=0.5, mode="online", fisher="sample", max_samples=7)
    other.load_state_dict(state)
    assert other.state_dict()["config"] == state["config"]
    value = reg.penalty().item()
    assert other.penalty().item() == value
    for f in state["tasks"][0]["fisher"].values():
        f.mul_(10.0)  # the caller modifies its dict afterwards
    assert other.penalty().item() == value
    assert other.num_tasks == 3


def test_load_state_dict_moves_tensors_to_the_parameters_dtype() -> None:
    reg = consolidated(EWC, "online")
    model64 = model_with_seed(0).double()
    model64.load_state_dict(reg.model.state_dict())
    other = EWC(model64, mode="online")
    other.load_state_dict(reg.state_dict())
    assert all(t.dtype == torch.float64 for t in other.state_dict()["tasks"][0]["fisher"].values())
    assert other.penalty().item() == pytest.approx(reg.penalty().item(), rel=1e-6)


def _renamed(state: dict) -> dict:
    task = state["tasks"][0]
    task["anchor"]["9.weight"] = task["anchor"].pop("2.weight")
    task["fisher"]["9.weight"] = task["fisher"].pop("2.weight")
    return state


def _reshaped(state: dict) -> dict:
    task = state["tasks"][1]
    task["anchor"]["0.bias"] = torch.zeros(5)
    task["fisher"]["0.bias"] = torch.ones(5)
    return state


def _set(key: str, value: object):
    def edit(state: dict) -> dict:
        state[key] = value
        return state

    return edit


def _edit_config(**changes: object):
    def edit(state: dict) -> dict:
        state["config"] = {**state["config"], **changes}
        return state

    return edit


def _drop_config(key: str):
    def edit(state: dict) -> dict:
        state["config"] = {k: v for k, v in state["config"].items() if k != key}
        return state

    return edit


def _negative_fisher(state: dict) -> dict:
    state["tasks"][0]["fisher"]["0.bias"] = -torch.ones(4)
    return state


def _unmatched_names(state: dict) -> dict:
    del state["tasks"][0]["fisher"]["0.bias"]
    return state


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_renamed, r"9\.weight.*missing"),
        (_reshaped, r"0\.bias.*shape"),
        (_set("class", "L2"), "L2"),
        (_set("format", "ewc.penalty/0"), "format"),
        (_set("num_tasks", 2), "num_tasks"),
        (_set("tasks", "nope"), "tasks"),
        (_edit_config(mode="online"), "mode"),
        (_edit_config(lam=-3.0), "lam"),
        (_edit_config(fisher="bogus"), "fisher must be one of .*, got 'bogus'"),
        (_edit_config(extra=1), "extra"),
        (_drop_config("gamma"), "gamma"),
        (_negative_fisher, "negative"),
        (_unmatched_names, r"0\.bias"),
    ],
)
def test_mismatched_state_is_rejected_and_changes_nothing(edit, match: str) -> None:
    reg = consolidated(EWC, "separate")
    target = EWC(reg.model, lam=2.0)
    target.consolidate(fisher_diag={n: torch.ones_like(p) for n, p in reg.model.named_parameters()})
    before = target.state_dict()
    value = target.penalty().item()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(edit(reg.state_dict()))
    assert_states_equal(target.state_dict(), before)
    assert target.penalty().item() == value and target.lam == 2.0


def test_loading_into_the_wrong_class_or_model_fails(tmp_path: Path) -> None:
    path = tmp_path / "l2.pt"
    l2 = consolidated(L2, "separate")
    l2.save(path)
    with pytest.raises(ValueError, match="L2"):
        EWC.load(path, l2.model)
    bigger = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"0\.weight.*shape"):
        L2.load(path, bigger)


def test_loading_a_damaged_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "reg.pt"
    reg = consolidated(EWC, "online")
    reg.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        EWC.load(path, reg.model)


def test_failed_save_keeps_the_previous_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "reg.pt"
    reg = consolidated(EWC, "separate", tasks=1)
    reg.save(path)
    reg.consolidate(fisher_diag={n: torch.ones_like(p) for n, p in reg.model.named_parameters()})

    def broken_replace(src, dst):
        raise OSError("no space left")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        reg.save(path)
    monkeypatch.undo()
    assert EWC.load(path, reg.model).num_tasks == 1
