"""The command line as a contract (issue 11): every command x bad input -> exit code and the first line of stderr.

Exit codes: 0 all done, 1 partly done (inputs skipped, said on stderr), 2 usage or input error with nothing done.
Run in-process through `finegrain.cli.main.main` on tiny fixtures; the trained run is timm's tiny
`test_efficientnet` at 32 px, one epoch, so the table stays fast.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from finegrain.cli.main import main
from finegrain.errors import FinegrainError
from tests.conftest import COLOURS, write_class_images

RUN_OPTIONS = ["backbone=test_efficientnet", "pretrained=false", "image_size=32", "epochs=1", "batch_size=8"]
RUN_OPTIONS += ["workers=0", "--regime", "full", "--no-progress"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Paths of every fixture the table names: data with splits, a flat folder, one class, empty, unreadable."""
    root = tmp_path_factory.mktemp("contract")
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "data" / "train" / name), COLOURS[c], 4, seed=c)
        write_class_images(str(root / "data" / "test" / name), COLOURS[c], 2, seed=10 + c)
        write_class_images(str(root / "flat" / name), COLOURS[c], 10, seed=20 + c)
    write_class_images(str(root / "one" / "train" / "red"), COLOURS[0], 4, seed=0)
    write_class_images(str(root / "one" / "test" / "red"), COLOURS[0], 2, seed=1)
    (root / "empty").mkdir()
    for name in ("red", "green"):
        (root / "bad" / name).mkdir(parents=True)
        (root / "bad" / name / "0.jpg").write_text("not an image")
    (root / "text.jpg").write_text("not an image")
    (root / "typed.yaml").write_text("epochs: [1, 2]\n")
    (root / "k.yaml").write_text("k: abc\n")
    (root / "unknown.yaml").write_text("bogus: 1\n")
    paths = {k: str(root / k) for k in ("data", "flat", "one", "empty", "bad")}
    paths.update({k: str(root / f"{k}.yaml") for k in ("typed", "k", "unknown")})
    paths.update(
        text=str(root / "text.jpg"),
        missing=str(root / "nowhere"),
        out=str(root / "out"),
        image=str(root / "data/test/red/000.jpg"),
    )
    return paths


@pytest.fixture(scope="module")
def built(fx):
    """A store of the data, a store of one class, and a run trained on the flat folder (records its split)."""
    fx = dict(fx)
    for name, data in (("store", fx["data"]), ("one_store", fx["one"])):
        fx[name] = os.path.join(fx["out"], name)
        assert main(["extract", data, "--out", fx[name], "--workers", "0", "--no-progress", "--image-size", "64"]) == 0
    fx["run"] = os.path.join(fx["out"], "run")
    assert main(["train", fx["flat"], "--out", fx["run"], *RUN_OPTIONS]) == 0
    return fx


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, (err.strip().splitlines() or [""])[0]


E = "finegrain: error: "
# (case, argv with {placeholders}, exit code, start of the first line of stderr)
TABLE = [
    # missing path
    (
        "missing",
        "extract {missing} --out {out}/x",
        2,
        E + "{missing} does not exist: give a folder of images or a CSV manifest",
    ),
    ("missing", "knn {missing}", 2, E),
    ("missing", "ncm {missing}", 2, E),
    ("missing", "probe {missing}", 2, E),
    ("missing", "search {missing} --query {image}", 2, E),
    (
        "missing",
        "train {missing} --out {out}/t",
        2,
        E + "{missing} does not exist: give a folder of images or a CSV manifest",
    ),
    ("missing", "predict {run} {missing}", 2, E + "nothing predicted, all 1 input(s) skipped: {missing}: no such"),
    ("missing", "predict {missing} {image}", 2, E + "no saved model in {missing}"),
    ("missing", "evaluate {run} {missing} --no-progress", 2, E),
    ("missing", "explain {missing} {image} --out {out}/e", 2, E + "no saved model in {missing}"),
    ("missing", "fixres {run} {missing} --size 40 --out {out}/f", 2, E),
    ("missing", "report {missing}", 2, E),
    ("missing", "fit {missing} --out {out}/fit --no-progress", 2, E),
    # wrong type
    ("type", "train {flat} --out {out}/t epochs=abc", 2, E + "epochs must be an integer >= 1, got 'abc'"),
    ("type", "train {flat} --out {out}/t --epochs abc", 2, E + "epochs must be an integer >= 1, got 'abc'"),
    ("type", "train {flat} --out {out}/t lr=fast", 2, E + "lr must be a number > 0, got 'fast'"),
    ("type", "train {flat} --out {out}/t --config {typed}", 2, E + "epochs must be an integer >= 1, got [1, 2]"),
    ("type", "train {flat} --out {out}/t crop_pct=2", 2, E + "crop_pct must be a number in (0, 1] or null, got 2"),
    ("type", "knn {store} --config {k}", 2, E + "k must be an integer >= 1, got 'abc'"),
    ("type", "extract {data} --out {out}/x --batch-size abc", 2, E + "argument --batch-size: invalid int value"),
    ("type", "evaluate {run} {flat} --bootstrap many", 2, E + "argument --bootstrap: invalid int value"),
    ("type", "predict {run} {image} -k 0", 2, E + "k must be an integer >= 1, got 0"),
    # unknown key
    ("key", "train {flat} --out {out}/t bogus=1", 2, E + "unknown option(s) bogus for TrainConfig; valid: "),
    ("key", "train {flat} --out {out}/t --bogus 1", 2, E + "unrecognized arguments: --bogus 1"),
    ("key", "knn {store} --config {unknown}", 2, E + "unknown option(s) bogus for EvalConfig"),
    ("key", "extract {data} --out {out}/x --config {unknown}", 2, E + "unknown option(s) bogus for ExtractConfig"),
    ("key", "predict {run} {image} --bogus 1", 2, E + "unrecognized arguments: --bogus 1"),
    ("key", "evaluate {run} {flat} --config {unknown}", 2, E + "unknown option(s) bogus for EvaluateConfig"),
    # unknown choice
    ("choice", "train {flat} --out {out}/t loss=foo", 2, E + "loss must be one of balanced-softmax, cb, ce, focal"),
    ("choice", "train {flat} --out {out}/t --regime bogus", 2, E + "regime must be one of auto, head, last:K, full"),
    ("choice", "train {flat} --out {out}/t sampler=x", 2, E + "sampler must be one of class-balanced, instance"),
    ("choice", "train {flat} --out {out}/t pooling=avg", 2, E + "pooling must be one of attn, gap, gem, max, gem:P"),
    ("choice", "knn {store} --norm bogus", 2, E + "norm must be one of none, l2, cl2n, pca-whiten, pca-whiten:K"),
    ("choice", "extract {data} --out {out}/x --precision fp64", 2, E + "argument --precision: invalid choice"),
    ("choice", "evaluate {run} {flat} --runtime gpu", 2, E + "argument --runtime: invalid choice"),
    ("choice", "bogus", 2, E + "argument command: invalid choice: 'bogus'"),
    # one class
    ("one class", "train {one} --out {out}/t", 2, E + "{one} holds one class (red): training needs at least 2"),
    ("one class", "probe {one_store}", 2, E + "{one_store}: the train split holds one class ('red')"),
    ("one class", "knn {one_store}", 2, E + "{one_store}: the train split holds one class ('red')"),
    # empty data
    ("empty", "extract {empty} --out {out}/x", 2, E),
    ("empty", "train {empty} --out {out}/t", 2, E),
    ("empty", "extract {bad} --out {out}/bad --workers 0 --no-progress", 2, E + "none of the 2 images of {bad}"),
    ("empty", "predict {run} {text} {data}", 2, E + "nothing predicted, all 2 input(s) skipped"),
    ("empty", "explain {run} {text} {missing} --out {out}/e", 2, E + "nothing explained, all 2 input(s) skipped"),
    # absent device (no CUDA: torch.cuda.is_available is patched to False)
    ("device", "extract {data} --out {out}/x --device cuda", 2, E + "device cuda is not available"),
    ("device", "train {flat} --out {out}/t device=cuda", 2, E + "device cuda is not available"),
    ("device", "train {flat} --out {out}/t --device cuda:1", 2, E + "device cuda:1 is not available"),
    ("device", "predict {run} {image} --device cuda", 2, E + "device cuda is not available"),
    ("device", "evaluate {run} {flat} --device cuda", 2, E + "device cuda is not available"),
    ("device", "explain {run} {image} --out {out}/e --device cuda", 2, E + "device cuda is not available"),
    ("device", "fixres {run} {data} --size 40 --out {out}/f --device cuda", 2, E + "device cuda is not available"),
    ("device", "fit {flat} --out {out}/fit --device cuda", 2, E + "device cuda is not available"),
    ("device", "extract {data} --out {out}/x --device tpu", 2, E + "device must be auto, cpu, cuda or cuda:N"),
    # prediction sets (issue 26): a coverage outside (0, 1), a model saved without calibration
    ("set", "predict {run} {image} --coverage 1.5", 2, E + "coverage must be a number between 0 and 1"),
    ("set", "predict {run} {image} --coverage 0.9", 2, E + "this model has no calibration for prediction sets"),
]


@pytest.mark.parametrize(("case", "argv", "code", "first"), TABLE, ids=[f"{r[0]}: {r[1].split()[0]}" for r in TABLE])
def test_contract(built, capsys, monkeypatch, case, argv, code, first):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    got, _, line = _run(argv.format(**built).split(), capsys)
    assert (got, line[: len(first.format(**built))]) == (code, first.format(**built)), line
    assert not os.path.exists(os.path.join(built["out"], "t")), "a refused train must not start a run"


def test_partly_done_is_exit_1_with_the_skipped_inputs_on_stderr(built, capsys):
    code, out, _ = _run(["predict", built["run"], built["image"], built["missing"], built["data"]], capsys)
    assert code == 1 and out.startswith(built["image"] + "\t") and len(out.splitlines()) == 1
    main(["predict", built["run"], built["image"], built["missing"], built["data"]])
    err = capsys.readouterr().err
    assert f"skipped {built['missing']}: no such file" in err and "is a directory" in err
    assert "2 of 3 input(s) skipped" in err


def test_extract_with_a_bad_file_is_exit_1_and_lists_it(fx, tmp_path, capsys):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(fx["data"], data)
    (data / "train" / "red" / "broken.jpg").write_text("not an image")
    out = str(tmp_path / "s")
    assert main(["extract", str(data), "--out", out, "--workers", "0", "--no-progress", "--image-size", "64"]) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and f"1 of 19 input(s) skipped, listed in {os.path.join(out, 'skipped.csv')}" in err


def test_help_is_exit_0_and_train_help_lists_every_option_with_its_default(capsys):
    import dataclasses

    from finegrain.config import TrainConfig

    assert main(["train", "--help"]) == 0
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    listed = [line.split()[0] for line in raw.splitlines() if line.startswith("  --")]
    for f in dataclasses.fields(TrainConfig)[1:]:  # data is the positional DATA; each option once, with its help
        assert listed.count("--" + f.name.replace("_", "-")) == 1 and f.metadata["help"][:30] in text, f.name
    assert "--epochs INT training epochs (default: 10)" in text and "--lr FLOAT the head's learning rate" in text
    assert "--early-stop INT patience" in text  # `int | None`: an INT, no "(default: None)"
    from finegrain.cli.commands import train_config
    from finegrain.cli.main import parse_args

    cfg = train_config(parse_args(["train", "--resume", "DATA", "--out", "o", "--pretrained", "false"]))
    assert cfg.data == "DATA" and cfg.resume and not cfg.pretrained  # a flag never eats the next word
    assert main(["evaluate", "--help"]) == 0
    assert "(default: 1000)" in capsys.readouterr().out  # --bootstrap


def test_fit_options_are_declared_once_in_fitconfig(capsys, tmp_path):
    """`finegrain fit`'s command line is generated from FitConfig (config.option): every field has its option with
    the declared help, choices and default; a YAML key and a Python keyword are checked by the same declaration."""
    import dataclasses

    import finegrain
    from finegrain.config import FitConfig

    assert main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(FitConfig)[1:]:  # data is the positional DATA
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in text and f.metadata["help"].split()[0] in text, f.name
    assert "--runtime {auto,torch,onnx}" in text and "(default: 10.0)" in text  # --budget-min
    (tmp_path / "bad.yaml").write_text("runtime: gpu\n")
    code, _, first = _run(["fit", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")],
                          capsys)  # fmt: skip
    assert code == 2 and first == E + "runtime must be one of auto, torch, onnx, got 'gpu'"
    with pytest.raises(FinegrainError, match="^runtime must be one of auto, torch, onnx, got 'gpu'$"):
        finegrain.fit(str(tmp_path), out=str(tmp_path / "o"), runtime="gpu")


def test_evaluate_options_are_declared_once_in_evaluateconfig(capsys):
    """`finegrain evaluate`'s command line is generated from EvaluateConfig: one or more models then the data, every
    option with its declared help and default; Python callers get the same defaults (runtime and device auto)."""
    import dataclasses

    from finegrain.cli.main import parse_args
    from finegrain.config import EVALUATE_OPTIONS, EvaluateConfig

    assert main(["evaluate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in EVALUATE_OPTIONS[2:]:  # models and data are positional
        field = EvaluateConfig.__dataclass_fields__[name]
        assert "--" + name.replace("_", "-") in text and field.metadata["help"].split()[0] in text, name
    args = parse_args(["evaluate", "a", "b", "data", "--sizes", "224,256", "--allow-train-images"])
    assert args.models == ["a", "b"] and args.data == "data" and args.sizes == ("224", "256")
    assert args.allow_train_images is True and args.bootstrap is None  # unset: the config's default applies
    cfg = EvaluateConfig(models=("m",), data="d")
    assert (cfg.runtime, cfg.device) == ("auto", "auto")
    assert "extra" not in EVALUATE_OPTIONS and dataclasses.fields(EvaluateConfig)[-1].name == "extra"


@pytest.mark.parametrize(
    "command", ["predict", "explain", "fixres", "report", "serve", "export", "search", "suggest", "demo"]
)
def test_the_model_commands_options_are_declared_once_in_their_typed_config(command, capsys):
    """Every command but fit, extract, train, evaluate and the store heads (tests of their own): the command line is
    generated from its typed config (config.PredictConfig, ExplainConfig, ...): every field is an option (or a
    positional) with its declared help; unset options stay None so that the --config file and the class's defaults
    apply under them; search's --query takes several words."""
    import dataclasses

    from finegrain import config
    from finegrain.cli.main import parse_args

    cls = getattr(config, command.capitalize() + "Config")  # PredictConfig, ..., DemoConfig
    positional = {"predict": ("model", "images"), "explain": ("model", "images"), "fixres": ("model", "data"),
                  "report": ("run",), "serve": ("model",), "export": ("model",), "search": ("store",),
                  "suggest": ("data",), "demo": ()}[command]  # fmt: skip
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        shown = f.name if f.name in positional else (f.metadata.get("flag") or "--" + f.name.replace("_", "-"))
        assert shown in text and f.metadata["help"].split()[0] in text, (command, f.name)
    args = parse_args([command, *["a", "b"][: len(positional)]])
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(cls) if f.name not in positional)
    if command == "search":
        assert parse_args(["search", "s", "--query", "a.jpg", "b.jpg", "-k", "3"]).query == ["a.jpg", "b.jpg"]


def test_both_option_syntaxes_and_the_yaml_file_build_the_same_config(fx, tmp_path):
    import argparse

    from finegrain.cli.commands import train_config
    from finegrain.cli.main import parse_args

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 3\nlr: 0.05\ncrop_scale: [0.5, 1]\n")
    a = train_config(parse_args(["train", fx["flat"], "--out", "o", "epochs=3", "lr=5e-2", "crop_scale=[0.5, 1]"]))
    options = ["--epochs", "3", "--lr", "0.05", "--crop-scale", "0.5,1"]
    b = train_config(parse_args(["train", fx["flat"], "--out", "o", *options]))
    c = train_config(parse_args(["train", fx["flat"], "--out", "o", "--config", str(yaml_file)]))
    assert a == b == c and a.epochs == 3 and a.lr == 0.05 and a.crop_scale == (0.5, 1.0) and a.device == "cpu"
    assert isinstance(parse_args(["train", fx["flat"], "--out", "o"]), argparse.Namespace)


def test_search_takes_the_store_positionally_and_as_index(built, capsys):
    assert main(["search", built["store"], "--query", built["image"], "-k", "2"]) == 0
    positional = capsys.readouterr().out
    assert main(["search", "--index", built["store"], "--query", built["image"], "-k", "2"]) == 0
    assert capsys.readouterr().out == positional and len(positional.splitlines()) == 3


def test_a_run_on_a_flat_folder_is_evaluated_on_its_recorded_test_images_only(built, capsys):
    """The leakage guard: the run holds out a seeded 10% of a flat folder; evaluate and report score only those."""
    run, flat = built["run"], built["flat"]
    with open(os.path.join(run, "splits.json"), encoding="utf-8") as f:
        splits = json.load(f)
    train, val, test = (set(splits[k]) for k in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 30 and len(test) == 3 and not (train | val) & test
    out = os.path.join(built["out"], "eval-flat")
    assert main(["evaluate", run, flat, "--out", out, "--bootstrap", "10", "--workers", "0", "--no-progress"]) == 0
    assert "recorded test images of the run: 3 of the 30" in capsys.readouterr().err
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["n"] == 3 and metrics["scored_images"]["includes_training_images"] is False
    with open(os.path.join(out, "predictions.csv"), encoding="utf-8") as f:
        scored = {line.split(",")[0] for line in f.read().splitlines()[1:]}
    assert scored == test

    for argv in (["evaluate", run, flat, "--split", "all", "--no-progress"], ["report", run, "--split", "all"]):
        code, _, line = _run(argv, capsys)
        assert code == 2 and line.startswith(E + "27 of the 30 images to score trained or validated the model")
        assert "--allow-train-images" in line

    out = os.path.join(built["out"], "eval-all")
    argv = ["evaluate", run, flat, "--split", "all", "--allow-train-images", "--out", out, "--bootstrap", "10"]
    assert main([*argv, "--workers", "0", "--no-progress"]) == 0
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        scored = json.load(f)["scored_images"]
    assert scored["includes_training_images"] is True and scored["training_images_scored"] == 27


def test_json_output_of_predict_search_and_evaluate_parses_and_matches_the_text(built, capsys):
    run, image, text = built["run"], built["image"], built["text"]
    assert main(["predict", run, image, "-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert main(["predict", run, image, text, "-k", "2", "--json"]) == 1  # one input skipped: partly done
    doc = json.loads(capsys.readouterr().out)
    (pred,) = doc["predictions"]
    assert pred["path"] == image and len(pred["top"]) == 2 and pred["top"][0]["class"] in ("red", "green", "blue")
    assert line.split("\t")[1].split()[0] == pred["top"][0]["class"]
    assert doc["skipped"][0]["path"] == text
    assert main(["search", built["store"], "--query", image, "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["queries"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
    out = os.path.join(built["out"], "eval-json")
    argv = ["evaluate", run, built["flat"], "--out", out, "--bootstrap", "10", "--workers", "0", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 3 and 0 <= doc["metrics"]["top1"] <= 1 and doc["out"] == out


def test_explain_skips_a_bad_image_with_exit_1_and_lists_it(built, capsys):
    out = os.path.join(built["out"], "explain-partly")
    assert main(["explain", built["run"], built["image"], built["text"], "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"skipped {built['text']}" in err and "1 of 2 input(s) skipped" in err
    with open(os.path.join(out, "explanations.json"), encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 2 and records[1]["path"] == built["text"] and "skipped" in records[1]


def test_a_trained_model_is_reused_as_a_backbone_and_its_weights_load_in_timm(built, tmp_path):
    import timm
    from safetensors.torch import load_file

    from finegrain.embed import FeatureStore
    from finegrain.models import load_model, save_timm_weights

    run, data = built["run"], built["data"]
    common = ["--workers", "0", "--no-progress", "--pooling", "gap"]
    by_run = str(tmp_path / "by-run")
    assert main(["extract", data, "--out", by_run, "--backbone", run, *common]) == 0
    weights = os.path.join(run, "model", "model.safetensors")
    by_ckpt = str(tmp_path / "by-ckpt")
    argv = ["extract", data, "--out", by_ckpt, "--backbone", "test_efficientnet", "--checkpoint", weights]
    assert main([*argv, "--image-size", "32", *common]) == 0
    fa, fb = FeatureStore.open(by_run).features("gap"), FeatureStore.open(by_ckpt).features("gap")
    assert fa.shape == fb.shape and float(abs(fa - fb).max()) < 1e-4  # the fine-tuned trunk both ways
    # the trunk's own key layout: timm loads it; with a plain linear head on GAP the logits are the model's
    model, spec = load_model(run)
    path = str(tmp_path / "timm.safetensors")
    assert save_timm_weights(model, path) is True
    assert main(["export", run, "--format", "timm", "--out", path]) == 0  # the same file through the CLI
    assert not any(k.startswith("backbone.") for k in load_file(path))
    overlay = dict(file=path, num_classes=len(spec.classes))
    net = timm.create_model("test_efficientnet", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-4)


def test_fixres_never_fits_on_test_images(built, capsys):
    argv = ["fixres", built["run"], built["data"], "--size", "40", "--out", "x", "--split", "test"]
    code, _, line = _run(argv, capsys)
    assert code == 2 and line.startswith(E + "fixres fits BatchNorm statistics and the head on --split test")
    # a flat folder: the run's recorded train images only (27 of 30 minus val), not its 3 held-out test images
    from finegrain.config import load_splits
    from finegrain.evaluate.fixres import fixres_samples

    paths, labels = fixres_samples(built["run"], built["flat"], "train", ["red", "green", "blue"])
    recorded = load_splits(built["run"])[1]
    assert {os.path.abspath(p) for p in paths} == {os.path.abspath(p) for p in recorded["train"]}
    assert not {os.path.abspath(p) for p in paths} & {os.path.abspath(p) for p in recorded["test"]}
    assert len(labels) == len(paths)


def test_every_command_takes_a_config_file_checked_like_the_command_line(built, tmp_path, capsys):
    from finegrain.cli.main import build_parser, parse_args

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert all(any("--config" in a.option_strings for a in p._actions) for p in sub.choices.values())
    good = tmp_path / "predict.yaml"
    good.write_text("k: 2\njson: true\n")
    assert main(["predict", built["run"], built["image"], "--config", str(good)]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"][0]["top"]) == 2
    assert parse_args(["predict", "m", "x.jpg", "--config", str(good), "-k", "4"]).k == 4  # the command line wins
    explain = tmp_path / "explain.yaml"
    explain.write_text(f"out: {tmp_path / 'e'}\nthreshold: 0.3\n")  # a required option from the file
    assert main(["explain", built["run"], built["image"], "--config", str(explain)]) == 0
    assert (tmp_path / "e" / "explanations.json").is_file()
    from finegrain.cli.commands import _overrides
    from finegrain.config import ExplainConfig, build_config

    args = parse_args(["explain", "m", "x.jpg", "--config", str(explain), "--method", "cam"])
    cfg = build_config(ExplainConfig, yaml_path=args.config, overrides=_overrides(args, ExplainConfig))
    assert (cfg.out, cfg.threshold, cfg.method, cfg.images) == (str(tmp_path / "e"), 0.3, "cam", ("x.jpg",))
    no_out = tmp_path / "no-out.yaml"
    no_out.write_text("threshold: 0.3\n")
    code, _, line = _run(["explain", built["run"], built["image"], "--config", str(no_out)], capsys)
    assert code == 2 and line == E + "explain needs --out FOLDER (or out: in --config) for the overlays"
    for text, first in (  # predict's options are its typed config (config.PredictConfig), checked by build_config
        ("k: many\n", "k must be an integer >= 1, got 'many'"),
        ("bogus: 1\n", "unknown option(s) bogus for PredictConfig; valid: "),
        ("runtime: gpu\n", "runtime must be one of auto, torch, onnx, got 'gpu'"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        argv = ["predict", built["run"], built["image"], "--config", str(bad)]
        code, _, line = _run(argv, capsys)
        assert code == 2 and line.startswith(E + first.format(bad)), line


def test_fit_with_no_image_on_disk_or_nowhere_to_write_is_one_line(fx, tmp_path, capsys):
    """Defects a new user hit (issue 24): a manifest whose files are all missing (was a numpy traceback) and an
    --out that cannot be written (was FileNotFoundError) are one-line errors, exit 2, before any work."""
    manifest = tmp_path / "gone.csv"
    rows = [f"{tmp_path}/gone/{c}/{i}.jpg,{c},train" for c in ("a", "b") for i in range(4)]
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    code, _, first = _run(["fit", str(manifest), "--out", str(tmp_path / "f"), "--no-progress"], capsys)
    assert code == 2 and first.startswith(E + "none of the 8 training images") and "manifest" in first
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, first = _run(["fit", fx["data"], "--out", str(blocker / "out"), "--no-progress"], capsys)
    assert code == 2 and first.startswith(E + f"cannot write to {blocker / 'out'}")


def test_predict_takes_a_fit_folder_holding_an_ensemble(built, tmp_path, capsys):
    """`finegrain predict RUNS/FIT` (the fit folder, not its model/): an ensemble was a KeyError traceback."""
    from finegrain.evaluate.predictor import Ensemble, load

    one = load(built["run"])
    Ensemble([one, one], [0.5, 0.5]).save(str(tmp_path / "fit" / "model"))
    code, out, _ = _run(["predict", str(tmp_path / "fit"), built["image"], "--json"], capsys)
    assert code == 0 and json.loads(out)
