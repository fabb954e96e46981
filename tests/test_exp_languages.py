"""`ewc experiment languages`: character LMs over word lists, one language after another (tiny word
lists made here; the real Debian lists in the contract test and in test_words.py)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from ewc import EWC
from ewc.cli import main
from ewc.data.words import LANGUAGES, CharVocab, encode_batch
from ewc.experiments import languages, languages_train
from ewc.experiments.languages import Config, bpc_metrics, choose, gap_closed, run
from ewc.experiments.languages_model import CharTransformer, bits_per_char, build_lm, lm_loss

torch.set_num_threads(1)

# two made-up "languages" with disjoint alphabets and their own word shapes: learning the second
# overwrites what the first needed, which is what the experiment is about
ALPHABETS = {"english": ("aeiou", "bcdfg"), "swedish": ("åäö", "klmnp")}


def word_lists(folder: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for name, (vowels, consonants) in ALPHABETS.items():
        words = set()
        while len(words) < n:
            k = rng.randint(2, 4)
            words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(k)))
        text = "\n".join(sorted(words)) + "\n"
        (folder / LANGUAGES[name].file).write_bytes(text.encode(LANGUAGES[name].encoding))
    return folder


TINY = {
    "languages": ("english", "swedish"),
    "train_words": 300,
    "val_words": 40,
    "test_words": 50,
    "max_length": 12,
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "steps": 30,
    "batch_size": 16,
    "lr": 1e-2,
    "lam_grid": (1.0, 1000.0),
    "online_lam_grid": (100.0,),
    "l2_lam_grid": (1.0,),
    "fisher_samples": 60,
    "fisher_batch": 30,
    "memory": 60,
    "replay_batch": 8,
    "seeds": (0,),
    "jobs": 1,
}


def without_timings(obj: object) -> object:
    if isinstance(obj, dict):
        skip = ("seconds", "cpu_seconds", "created", "command")
        return {k: without_timings(v) for k, v in obj.items() if k not in skip}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    if isinstance(obj, str) and "CPU time" in obj:
        return "CPU time"
    return obj


def test_bits_per_char_against_independent_references() -> None:
    vocab = CharVocab.of(["abc", "cab"])
    words = [vocab.encode(w) for w in ["abc", "cab", "a", "bbca"]]

    class Uniform(torch.nn.Module):  # every token equally likely: log2(V) bits per character
        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*input_ids.shape, len(vocab))

    assert bits_per_char(Uniform(), words, batch_size=3) == pytest.approx(math.log2(len(vocab)))
    # Hugging Face's own causal-LM loss (mean over the shifted targets) of one batch, in bits
    model = build_lm("gpt2", len(vocab), n_positions=8, n_embd=16, n_layer=1, n_head=2, seed=0)
    batch = encode_batch(words)
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item() / math.log(2)
    assert bits_per_char(model, words, batch_size=2) == pytest.approx(reference, rel=1e-5)
    assert model.training  # the mode is restored


def test_the_fisher_of_a_word_is_the_sum_over_its_characters() -> None:
    """EWC's Fisher on the experiment's batches (own model, empirical) against per-word autograd."""
    vocab = CharVocab.of(["abcd"])
    words = [vocab.encode(w) for w in ["abc", "d", "cabd", "bb", "dcba"]]
    model = CharTransformer(len(vocab), n_positions=8, n_embd=8, n_layer=1, n_head=2).double()
    reg = EWC(model, fisher="empirical", batch_size=2)
    fisher = reg.consolidate([encode_batch(words[:3]), encode_batch(words[3:])], shift_labels=True)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for w in words:
        model.zero_grad()
        lm_loss(model, encode_batch([w]), reduction="sum").backward()  # −log p(word)
        for n, p in model.named_parameters():
            expected[n] += p.grad**2 / len(words)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-6, atol=1e-12)


def test_metrics_from_a_matrix() -> None:
    R = [[2.0, 5.0, 5.2], [3.0, 2.5, 4.0], [3.5, 3.0, 2.2]]
    m = bpc_metrics(R, [5.5, 5.5, 5.5])
    assert m["final"] == pytest.approx((3.5 + 3.0 + 2.2) / 3)
    assert m["learned"] == pytest.approx((2.0 + 2.5 + 2.2) / 3)
    assert m["forgetting"] == pytest.approx(((3.5 - 2.0) + (3.0 - 2.5)) / 2)
    assert m["first_rise"] == pytest.approx(1.5)
    assert m["transfer"] == pytest.approx(((5.5 - 5.0) + (5.5 - 4.0)) / 2)
    assert gap_closed(3.5, 4.0, 3.0) == pytest.approx(0.5) and math.isnan(gap_closed(3.0, 3.0, 3.0))
    assert choose([1.0, 10.0, 100.0], [3.2, 3.1, 3.1]) == 10.0


def test_run_record(tmp_path: Path) -> None:
    config = Config(**TINY, dict_dir=str(word_lists(tmp_path)))
    res = run(config)["results"]
    methods = res["methods"]
    assert list(methods) == list(languages_train.METHODS)
    # the pilot ran on the validation words and picked one of its λ; single values are used as given
    assert set(res["selection"]) == {"ewc"} and res["selection"]["ewc"]["chosen"] in (1.0, 1000.0)
    assert methods["ewc"]["lam"] == res["selection"]["ewc"]["chosen"] and methods["l2"]["lam"] == 1.0
    for m, e in methods.items():
        (r,) = e["runs"]
        assert r["split"] == "test" and r["method"] == m and len(r["matrix"]) == 2
        assert r["metrics"] == bpc_metrics(r["matrix"], r["initial"])
        # the same initial weights, and the same first language for everyone
        assert r["initial"] == methods["finetune"]["runs"][0]["initial"]
        assert r["matrix"][0] == methods["finetune"]["runs"][0]["matrix"][0]
    ft, ewc = methods["finetune"]["runs"][0], methods["ewc"]["runs"][0]
    assert ft["metrics"]["first_rise"] > 0.3  # fine-tuning forgets the first alphabet
    assert ewc["matrix"][1][0] < ft["matrix"][1][0]
    assert methods["ewc"]["gap_closed"]["final"] == [
        gap_closed(
            ewc["metrics"]["final"], ft["metrics"]["final"], methods["joint"]["runs"][0]["metrics"]["final"]
        )
    ]
    assert "gap_closed" in methods["replay"] and methods["joint"]["gap_closed"]["final"] == [1.0]


def test_the_three_paths_agree(tmp_path: Path) -> None:
    """The library loop, EWCTrainer and the Lightning EWCCallback: the same steps, the same numbers."""
    folder = str(word_lists(tmp_path))
    tiny = {**TINY, "steps": 12, "model": "gpt2", "methods": ("finetune", "ewc"), "lam_grid": (100.0,)}
    records = {p: run(Config(**tiny, dict_dir=folder, path=p))["results"] for p in languages_train.PATHS}
    base = records["library"]["methods"]
    assert base["ewc"]["matrix"][1][0] < base["finetune"]["matrix"][1][0] - 0.05  # EWC acted
    for path in ("transformers", "lightning"):
        for m in ("finetune", "ewc"):
            got, want = records[path]["methods"][m]["matrix"], base[m]["matrix"]
            assert records[path]["methods"][m]["runs"][0]["path"] == path
            diff = max(
                abs(a - b) for ra, rb in zip(got, want, strict=True) for a, b in zip(ra, rb, strict=True)
            )
            assert diff < 1e-3, (path, m, diff)


def test_own_model_trains_every_kind_of_method(tmp_path: Path) -> None:
    tiny = {**TINY, "model": "own", "methods": ("finetune", "online-ewc", "replay"), "steps": 10}
    res = run(Config(**tiny, dict_dir=str(word_lists(tmp_path))))["results"]
    assert res["model"] == "own" and res["parameters"] > 0
    assert all(len(e["matrix"]) == 2 for e in res["methods"].values())


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lists").mkdir()
    folder = str(word_lists(tmp_path / "lists"))
    config = Config(
        **{**TINY, "methods": ("finetune", "ewc", "replay"), "lam_grid": (10.0,)}, dict_dir=folder
    )
    whole = without_timings(run(config, str(tmp_path / "whole")))
    original, calls = languages_train.evaluate, {"n": 0}

    def evaluate(*args: object, **kwargs: object) -> list[float]:
        calls["n"] += 1
        if calls["n"] == 9:  # replay's run (after finetune's and ewc's 3 rows): its last row
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(languages_train, "evaluate", evaluate)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(config, str(out))
    assert (
        len(list((out / "progress").glob("*.json"))) == 2 and len(list((out / "progress").glob("*.pt"))) == 1
    )
    monkeypatch.setattr(languages_train, "evaluate", original)
    assert without_timings(run(config, str(out))) == whole


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"path": "lightning", "methods": ("ewc", "replay")},
            "--path lightning runs finetune, ewc, online-ewc only",
        ),
        ({"n_embd": 30, "n_head": 4}, r"n_head \(4\) must divide n_embd \(30\)"),
        ({"languages": ("english", "klingon")}, "languages must be"),
        ({"seeds": (1, 1)}, "seeds must be a non-empty list of distinct values"),
        ({"seed": -1}, "seed"),
        ({"lam_grid": (0.0,)}, "lam_grid"),
        ({"fisher": "batched"}, "fisher"),
    ],
)
def test_config_refusals(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**kw)


def test_missing_word_list_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["experiment", "languages", "--dict-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install wamerican" in err


def test_cli(tmp_path: Path) -> None:
    folder = word_lists(tmp_path)
    argv = ["experiment", "languages", "--dict-dir", str(folder), "--languages", "english,swedish"]
    argv += ["--train-words", "200", "--val-words", "20", "--test-words", "30", "--steps", "5"]
    argv += ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--methods", "finetune,ewc,joint"]
    argv += ["--lam-grid", "10,20", "--fisher-samples", "40", "--seed", "7", "--seeds", "0,1", "--jobs", "1"]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["experiment"] == "languages" and record["config"]["seeds"] == [0, 1]
    ewc = record["results"]["methods"]["ewc"]
    selection = record["results"]["selection"]["ewc"]
    assert selection["seed"] == 7 and ewc["lam"] == selection["chosen"] in (10.0, 20.0)
    assert (
        len(ewc["runs"]) == 2
        and len(ewc["gap_closed"]["final"]) == 2
        and [r["seed"] for r in ewc["runs"]] == [0, 1]
    )
    # the gap of each seed against fine-tuning's and joint's runs of the same seed, by hand
    last = {m: [sum(r["matrix"][-1]) / 2 for r in e["runs"]] for m, e in record["results"]["methods"].items()}
    for k in range(2):
        by_hand = (last["finetune"][k] - last["ewc"][k]) / (last["finetune"][k] - last["joint"][k])
        assert ewc["gap_closed"]["final"][k] == pytest.approx(by_hand, rel=1e-9)
    report = (out / "report.md").read_text()
    assert (
        languages.TITLE in report and "Gap closed" in report and "seed 1" in report and "(seed 7;" in report
    )
    assert (out / "matrix.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000


def test_the_pilot_reads_validation_words_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluation of the λ pilot is on the validation words; the test words are read only by the
    final runs, which start after the pilot (jobs = 1 runs them in order)."""
    config = Config(
        **{**TINY, "methods": ("finetune", "ewc", "l2"), "steps": 5}, dict_dir=str(word_lists(tmp_path))
    )
    original, splits = languages_train.evaluate, []

    def evaluate(model: torch.nn.Module, tasks: list, split: str) -> list[float]:
        splits.append(split)
        return original(model, tasks, split)

    monkeypatch.setattr(languages_train, "evaluate", evaluate)
    res = run(config)["results"]
    pilot_jobs = sum(len(g) for g in languages.grids(config).values() if len(g) > 1)
    assert pilot_jobs >= 2
    rows = len(config.languages) + 1  # the untrained row, then one per language
    assert splits[: pilot_jobs * rows] == ["val"] * (pilot_jobs * rows)
    assert splits[pilot_jobs * rows :] == ["test"] * (3 * rows)
    assert set(res["selection"]) == {m for m, g in languages.grids(config).items() if len(g) > 1}


def test_hidden_extras_fall_back_or_refuse_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without transformers ``auto`` trains the plain-PyTorch model; ``--model gpt2`` and the two
    integration paths name the extra to install, in one line, before any job."""
    import importlib.util

    folder = str(word_lists(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("transformers", "lightning") else real(name, *a),
    )
    res = run(Config(**{**TINY, "methods": ("finetune",), "steps": 3}, dict_dir=folder))["results"]
    assert res["model"] == "own" and res["parameters"] > 0
    base = ["experiment", "languages", "--dict-dir", folder, "--languages", "english,swedish"]
    base += ["--methods", "finetune,ewc", "--steps", "2"]
    for extra, want in (
        (["--model", "gpt2"], "--model gpt2 needs transformers: pip install 'ewc[transformers]'"),
        (
            ["--path", "transformers"],
            "--path transformers needs transformers: pip install 'ewc[transformers]'",
        ),
        (["--path", "lightning"], "--path lightning needs lightning: pip install 'ewc[lightning]'"),
    ):
        assert main([*base, *extra, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err == f"ewc: error: {want}\n"
    assert not (tmp_path / "out" / "progress").exists() or not any((tmp_path / "out" / "progress").iterdir())


def test_a_job_is_named_by_the_model_it_trains_and_the_words_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run never mixes jobs of another model (``auto`` resolved otherwise) or of a word list
    changed on disk; a corrupt record is named."""
    import importlib.util

    folder = word_lists(tmp_path)
    s = languages.settings(Config(**TINY, dict_dir=str(folder)))
    spec = {"settings": s, "method": "ewc", "seed": 0, "lam": 1.0, "split": "val"}
    first = languages_train.job_tag(spec)
    real = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
        )
        assert languages_train.job_tag(spec) != first  # auto is now own
    assert languages_train.job_tag(spec) == first
    english = folder / LANGUAGES["english"].file
    english.write_bytes(english.read_bytes() + b"zazaza\n")
    languages_train._TASKS.clear()
    assert languages_train.job_tag(spec) != first
    progress = tmp_path / "progress"
    progress.mkdir()
    (progress / f"{languages_train.job_tag(spec)}.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt progress file .*delete it"):
        languages_train.run_job({**spec, "progress": str(progress)})
