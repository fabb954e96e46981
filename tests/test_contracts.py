"""Contract tests over the registries: every method, dataset, model and experiment, whatever its name.

The model is scikit-learn's ``check_estimator``: a new entry in a registry is tested here without a
line of test code of its own. Methods train two tiny tasks through the real loop, round-trip their
state and a saved checkpoint, and come back with identical predictions and an identical loss.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import same_state

from ewc.checkpoint import load_checkpoint, save_checkpoint
from ewc.cli import build_parser, config_from
from ewc.config import config_dict
from ewc.data import DATASETS, DataNotFoundError, Task, load_dataset
from ewc.experiments import EXPERIMENTS, get_experiment
from ewc.experiments import stream as stream_experiment
from ewc.methods import METHOD_SPECS, METHODS, Batch, make_method
from ewc.models import MODELS, build_model, model_options
from ewc.train import TrainConfig, method_params, run_method

CONFIG = TrainConfig(
    epochs=1,
    batch_size=16,
    hidden=(12,),
    eval_every=4,
    curve_samples=8,
    fisher_samples=32,
    seed=3,
    threads=1,
    progress=False,
    # small memories so that the memory methods store a part of each task, not all of it
    params={m: {"capacity": 20} for m in METHODS if "capacity" in METHOD_SPECS[m].defaults},
)


def tiny_tasks(n_tasks: int = 2, n: int = 48, dim: int = 10, classes: int = 4) -> list[Task]:
    """Linearly separable Gaussian blobs per task (a different direction per task), seeded."""
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(n_tasks):
        centres = torch.randn(classes, dim, generator=gen) * 3
        parts = []
        for size in (n, 16, 16):  # train, validation, test
            y = torch.arange(size) % classes
            parts += [centres[y] + torch.randn(size, dim, generator=gen), y]
        tasks.append(Task(f"t{t}", t, *parts, tuple(range(classes))))
    return tasks


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_round_trips_and_reloads(name: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tasks = tiny_tasks()
    res = run_method(tasks, name, CONFIG)
    model, method = res.pop("model"), res.pop("method")
    assert method.name == name
    matrix = torch.tensor(res["accuracy_matrix"])
    assert matrix.shape == (2, 2) and bool(((matrix >= 0) & (matrix <= 1)).all())
    assert res["memory_bytes"] == method.memory_bytes() >= 0

    # state_dict → a fresh learner on a copy of the network: the same state, the same loss
    state = method.state_dict()
    twin_model = copy.deepcopy(model)
    twin = make_method(name, **method_params(name, CONFIG))
    twin.setup(twin_model, method.scenario)
    twin.load_state_dict(state)
    assert same_state(twin.state_dict(), state)

    # a saved checkpoint: identical predictions, memory and loss on a batch of the next task
    path = tmp_path / f"{name}.pt"
    arch = res["architecture"]
    params = method_params(name, CONFIG)
    save_checkpoint(
        path, model, method, name=name, params=params, scenario=method.scenario, architecture=arch
    )
    loaded_model, loaded, scenario = load_checkpoint(path)
    assert scenario.kind == method.scenario.kind
    x, y = tasks[1].x_test, tasks[1].y_test
    model.eval(), loaded_model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded_model(x))
    assert loaded.memory_bytes() == method.memory_bytes()
    for net in (model, loaded_model, twin_model):
        net.train()
    with torch.no_grad():
        for net in (model, loaded_model, twin_model):  # move off the anchors: penalties are > 0
            for p in net.parameters():
                p.add_(0.01)
    losses = []
    for learner, net in ((method, model), (loaded, loaded_model), (twin, twin_model)):
        torch.manual_seed(0)  # methods that sample (replay) draw the same batch
        out = net(x)
        task_loss = torch.nn.functional.cross_entropy(out, y)
        losses.append(float(learner.loss(task_loss, Batch(x, y, out, 1)).detach()))
    assert losses[0] == losses[1] == losses[2]


def test_every_method_spec_is_complete() -> None:
    for name in METHODS:
        spec = METHOD_SPECS[name]
        assert spec.name == name and spec.label and spec.help and spec.color.startswith("#")
        assert set(spec.grid) <= set(spec.defaults), f"{name}: a grid names an unknown parameter"
        assert set(spec.run_params) <= set(spec.defaults), f"{name}: run_params names an unknown parameter"
        run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        assert set(spec.run_params.values()) <= run_fields, f"{name}: run_params names an unknown setting"
        make_method(name, **spec.combinations()[0])  # every grid point builds
    colours = [METHOD_SPECS[m].color for m in METHODS]
    assert len(set(colours)) == len(colours), "two methods share a colour"


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_loads_with_its_declared_shapes(name: str) -> None:
    spec = DATASETS[name]
    try:
        ds = load_dataset(name, download=False)
    except DataNotFoundError as err:  # file-based data that is not on this machine: a clear message
        assert "not found" in str(err) and name.replace("-", "").lower()[:5] in str(err).lower().replace(
            "-", ""
        )
        return
    assert ds.name == name
    assert ds.image_shape == spec.image_shape and tuple(ds.x_train.shape[1:]) == spec.image_shape
    assert tuple(ds.x_test.shape[1:]) == spec.image_shape
    assert ds.num_classes == spec.num_classes
    assert int(ds.y_train.min()) == 0 and int(ds.y_train.max()) == spec.num_classes - 1
    assert len(ds.x_train) == len(ds.y_train) > 0 and len(ds.x_test) == len(ds.y_test) > 0


#: one sample's shape as tasks give it: [H, W] data gets a channel, RGB images, small images
IMAGE_SHAPES = ((1, 28, 28), (28, 28), (3, 32, 32), (3, 8, 8))
#: not images: rows of features, a 4-D sample
OTHER_SHAPES = ((20,), (2, 3, 4, 5))


def _weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_for_image_shapes_seeded(name: str) -> None:
    """Images of any size and channel count: logits [N, outputs]; the seed decides the weights."""
    for shape in IMAGE_SHAPES:
        torch.manual_seed(1)
        a = build_model(name, shape, 7)
        torch.manual_seed(1)
        b = build_model(name, shape, 7)
        torch.manual_seed(2)
        c = build_model(name, shape, 7)
        assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b), strict=True))
        assert not all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(c), strict=True))
        a.eval()
        with torch.no_grad():
            assert a(torch.rand(5, *shape)).shape == (5, 7), shape
    with pytest.raises(ValueError, match="takes no option"):
        build_model(name, (1, 8, 8), 2, no_such_option=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no-such-model", (4,), 2)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_takes_other_inputs_or_refuses_them_clearly(name: str) -> None:
    for shape in OTHER_SHAPES:
        try:
            net = build_model(name, shape, 3)
        except ValueError as err:  # an image model: the error names the shape it was given
            assert str(tuple(shape)) in str(err) and "images" in str(err)
            continue
        assert net(torch.rand(4, *shape)).shape == (4, 3)
    assert build_model("mlp", (20,), 3)(torch.rand(4, 20)).shape == (4, 3)  # the default takes any shape


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_works_with_the_fisher_engine(name: str) -> None:
    """The engine's Fisher equals the per-sample float64 reference, with per-layer rules for
    every parameter (no warning: no rerouting through per-sample gradients of the whole model)."""
    import warnings

    from conftest import assert_fisher_close, reference_fisher

    from ewc.fisher import diagonal_fisher

    torch.manual_seed(0)
    net = build_model(name, (2, 8, 8), 3).double()
    net.train()
    with torch.no_grad():  # BatchNorm: running statistics away from their initial (0, 1)
        net(torch.rand(16, 2, 8, 8, dtype=torch.float64))
    x, y = torch.rand(6, 2, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = diagonal_fisher(net, (x, y), "exact")
    assert_fisher_close(got, reference_fisher(net, [(x, y)], "exact"), net)
    assert net.training  # left as it was


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    net = build_model(name, (1, 8, 8), 3)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    before = _weights(net)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.01).step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(net(x), y)
    assert float(after) < float(loss.detach())
    assert all(not torch.equal(p, q) for p, q in zip(before, _weights(net), strict=True))


def tiny_images(n_tasks: int = 2) -> list[Task]:
    """:func:`tiny_tasks` with each sample a 1×4×4 image."""
    return [
        dataclasses.replace(
            t, **{f"x_{p}": getattr(t, f"x_{p}").reshape(-1, 1, 4, 4) for p in ("train", "val", "test")}
        )
        for t in tiny_tasks(n_tasks, dim=16)
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_through_the_loop_and_its_checkpoint_reloads(name: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    hidden = CONFIG.hidden if "hidden" in model_options(name, hidden=()) else TrainConfig().hidden
    config = dataclasses.replace(CONFIG, model=name, hidden=hidden)
    tasks = tiny_images()
    res = run_method(tasks, "ewc", config)
    model, method = res.pop("model"), res.pop("method")
    assert res["architecture"]["model"] == name and len(res["accuracy_matrix"]) == 2
    assert res["architecture"]["input_shape"] == [1, 4, 4]
    path = tmp_path / "ck.pt"
    params = method_params("ewc", config)
    save_checkpoint(
        path,
        model,
        method,
        name="ewc",
        params=params,
        scenario=method.scenario,
        architecture=res["architecture"],
    )
    loaded, _, _ = load_checkpoint(path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(tasks[1].x_test), loaded(tasks[1].x_test))


def test_a_user_registered_model_method_and_dataset_run() -> None:
    """Entries registered after import, with the smallest signatures the docs allow, just work."""
    import ewc.data.datasets as datasets
    import ewc.methods.registry as registry
    import ewc.models as models
    from ewc.experiments.sequence import run_sequence
    from ewc.methods import Method
    from ewc.methods.registry import MethodSpec, register

    saved = [(r, dict(r)) for r in (models.MODELS, registry.METHOD_SPECS, datasets.DATASETS)]
    try:

        @models.register_model("linear")
        def linear(input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_outputs))

        class Mine(Method):
            name = "mine"

        register(MethodSpec("mine", Mine, help="plain fine-tuning again", label="Mine", order=-1))
        source = load_dataset("digits")

        @datasets.register_dataset("tiny-digits", image_shape=(8, 8), num_classes=10)
        def tiny() -> datasets.Dataset:
            return source

        assert list(registry.METHOD_SPECS)[0] == "mine"  # placed by its declared order
        # (a model that takes no hidden sizes is refused with non-default --hidden: back to the default)
        config = dataclasses.replace(CONFIG, model="linear", hidden=TrainConfig().hidden, params={})
        res = run_sequence("split", "tiny-digits", 2, ["mine", "sgd"], config, report=False)
        assert set(res["methods"]) == {"mine", "sgd"}
        assert res["methods"]["mine"]["architecture"]["model"] == "linear"
    finally:  # the registries as they were
        for live, before in saved:
            live.clear()
            live.update(before)


EXPERIMENT_MODULES = [*EXPERIMENTS, "stream"]


@pytest.mark.parametrize("name", EXPERIMENT_MODULES)
def test_every_experiment_runs_at_its_smallest_size(name: str, tmp_path: Path) -> None:
    """Each writes its record, figures and report; its recorded command rebuilds its config."""
    torch.set_num_threads(1)
    module = stream_experiment if name == "stream" else get_experiment(name)
    assert module.TITLE and module.CLAIM
    config = module.Config(**module.SMALLEST)
    out = tmp_path / name
    record = module.run(config, out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"] == config_dict(config) == json.loads(json.dumps(record["config"]))
    assert saved["findings"] and all(isinstance(s, str) and s for s in saved["findings"])
    report = (out / "report.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures and all(f"]({f})" in report for f in figures)
    # the recorded command, through the real parser, gives back the same config
    argv = shlex.split(saved["command"].replace("OUT", str(out)))[1:]
    args = build_parser().parse_args(argv)
    assert config_from(args, args.config_cls) == config
