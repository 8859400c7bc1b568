"""One function per subcommand: config in, library calls, files and a short summary out.

Each returns the exit code: 0 all done, 1 partly done (inputs skipped: the summary says how many and where they are
listed); input errors raise FinegrainError (exit 2). Results go to stdout, skipped inputs and warnings to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from finegrain.cli.output import _print_json, _say_scored, _skipped_summary, _stderr, say_answer, say_engines, say_sets  # noqa: F401
from finegrain.config import EvalConfig, EvaluateConfig, ExtractConfig, build_config, config_choices
from finegrain.errors import FinegrainError
from finegrain.evaluate.store_eval import evaluate_store
from finegrain.runtime.settings import resolve_device  # noqa: F401 - serve_cmd and suggest_cmd import it here

CLI_DEFAULTS = {"device": "auto"}  # under the YAML file and the command line, over the dataclass defaults


def _overrides(args: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _with_device(cfg):
    return dataclasses.replace(cfg, device=resolve_device(cfg.device))


def _cli_config(cls, args: argparse.Namespace, overrides: dict, choices: dict):
    """A command's config: CLI defaults <- --config YAML <- options, validated, with its device resolved."""
    cfg = build_config(cls, yaml_path=args.config, overrides=overrides, defaults=CLI_DEFAULTS, choices=choices)
    return _with_device(cfg)


def cmd_extract(args: argparse.Namespace) -> int:
    from finegrain.embed.folder import extract_folder

    cfg = _cli_config(ExtractConfig, args, _overrides(args, ExtractConfig), config_choices(ExtractConfig))
    done = extract_folder(cfg, progress=not args.no_progress)
    if done.line:
        print(done.line)
    if done.result.skipped and done.line:
        _skipped_summary(done.result.skipped, done.result.n_images, done.listed)
    return 1 if done.result.skipped else 0


def _eval_cfg(args: argparse.Namespace, classifier: str) -> EvalConfig:
    over = _overrides(args, EvalConfig)
    over["classifier"] = classifier
    return build_config(EvalConfig, yaml_path=args.config, overrides=over, choices=config_choices(EvalConfig))


def cmd_knn(args: argparse.Namespace) -> int:
    return _print_eval(evaluate_store(_eval_cfg(args, "knn")))


def cmd_ncm(args: argparse.Namespace) -> int:
    return _print_eval(evaluate_store(_eval_cfg(args, "ncm")))


def cmd_probe(args: argparse.Namespace) -> int:
    return _print_eval(evaluate_store(_eval_cfg(args, "probe")))


def _print_eval(result) -> int:
    if result.line:  # empty on a torchrun rank other than 0
        print(result.line)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from finegrain.config import SearchConfig
    from finegrain.heads.search import search_store

    args = build_config(SearchConfig, yaml_path=args.config, overrides=_overrides(args, SearchConfig))
    if args.store and args.index and args.store != args.index:
        raise FinegrainError(f"two stores given ({args.store} and --index {args.index}): give one")
    store = args.store or args.index
    if not store or not args.query:
        raise FinegrainError("give the store and the query image(s): finegrain search STORE --query IMAGE")
    results = search_store(store, list(args.query), k=args.k, pooling=args.pooling, norm=args.norm)
    if args.json:
        hits = {q: [{"rank": r, "score": s, "path": p, "label": lab} for r, (s, p, lab) in enumerate(h, 1)]
                for q, h in results.items()}  # fmt: skip
        _print_json({"store": store, "queries": [{"query": q, "hits": h} for q, h in hits.items()]})
        return 0
    for query, hits in results.items():
        print(query)
        for rank, (score, path, label) in enumerate(hits, 1):
            print(f"  {rank:2d}  {score:.4f}  {label}  {path}")
    return 0


def train_config(args: argparse.Namespace):
    """TrainConfig from defaults <- --config YAML <- key=value words <- --name VALUE options (all YAML-parsed)."""
    from finegrain.config import TrainConfig, parse_overrides
    from finegrain.train.options import train_choices

    options = _overrides(args, TrainConfig)
    for k, v in options.items():  # --loss-options "{beta: 0.99}", --crop-scale "[0.2, 1]": read as YAML, as name=value
        if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
            options[k] = parse_overrides([f"{k}={v}"])[k]
    over = {**parse_overrides(args.overrides), **options}
    return _cli_config(TrainConfig, args, over, train_choices())


def cmd_train(args: argparse.Namespace) -> int:
    from finegrain.train.engine import train
    from finegrain.train.options import check_two_classes

    cfg = train_config(args)
    check_two_classes(cfg.data)
    if cfg.unlabeled:
        from finegrain.recipe.unlabeled import train_distilled_from_folder

        result = train_distilled_from_folder(cfg, progress=not args.no_progress)
    else:
        result = train(cfg, progress=not args.no_progress)
    line = f"best epoch {result.best_epoch}: val top-1 {result.best_val_top1:.4f}"
    if result.test_metrics:
        t = result.test_metrics
        line += f"; test top-1 {t['top1']:.4f}, mean per-class {t['mean_per_class']:.4f}"
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{line} -> {cfg.out}")
    if result.skipped:
        _skipped_summary(result.skipped, None, os.path.join(cfg.out, "metrics.json"))
    return 1 if result.skipped else 0


def cmd_fit(args: argparse.Namespace) -> int:
    from finegrain.config import config_choices
    from finegrain.recipe import FitConfig, fit

    cfg = _cli_config(FitConfig, args, _overrides(args, FitConfig), config_choices(FitConfig))
    result = fit(cfg, progress=not args.no_progress)
    est = result.chosen.estimate
    line = f"chose {result.chosen.name}: {'validation' if est == 'val' else est} top-1 {result.chosen.score_top1:.4f}"
    if result.test:
        m = result.test["metrics"]
        how = "TRANSDUCTIVE: test images used unlabeled" if cfg.transductive else "scored once, at the end"
        line += f"; test top-1 {m['top1']:.4f}, mean per-class {m['mean_per_class']:.4f} ({how})"
    print(f"{line}; {result.seconds / 60:.1f} min -> {os.path.join(cfg.out, 'model')}")
    print(f"  predict with: finegrain predict {os.path.join(cfg.out, 'model')} IMAGE...")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from finegrain.config import PredictConfig
    from finegrain.data import ImageDecodeError
    from finegrain.data.decode import unreadable
    from finegrain.evaluate.predictor import load

    args = _cli_config(PredictConfig, args, _overrides(args, PredictConfig), config_choices(PredictConfig))
    predictor = load(args.model, device=args.device, runtime=args.runtime)
    skipped, predictions = [], []
    for path in args.images:
        reason, answer = unreadable(path), {}
        try:
            if reason is None and args.coverage is not None:
                answer = predictor.answers(predictor.predict_proba([path]), args.coverage)[0]
                top = answer["set"]
            else:
                top = predictor.predict([path], k=args.k)[0] if reason is None else None
        except ImageDecodeError as e:
            reason = str(e)
        if reason is not None:
            skipped.append((path, reason))
            continue
        key = "top" if args.coverage is None else "set"
        row = {"path": path, key: [{"class": name, "probability": p} for name, p in top]}
        predictions.append(row | ({"unknown": answer["unknown"]} if answer else {}))
        if not args.json:
            print(path + "\t" + say_answer(top, answer, args.coverage, len(predictor.classes)), flush=True)
    if args.json:
        _print_json(
            {"model": args.model, "predictions": predictions, "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        )
    if len(skipped) == len(args.images):
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise FinegrainError(f"nothing predicted, all {len(skipped)} input(s) skipped: {reasons}")
    if skipped:
        _skipped_summary(skipped, len(args.images), "the lines above")
    say_engines(predictor)
    return 1 if skipped else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from finegrain.evaluate.evaluation import evaluate_models
    from finegrain.evaluate.tta import TTA

    cfg = _cli_config(EvaluateConfig, args, _overrides(args, EvaluateConfig), config_choices(EvaluateConfig))
    tta = TTA.parse(cfg.tta, list(cfg.sizes) or None)
    first = cfg.models[0].rstrip("/")
    out = cfg.out or os.path.join(first, f"eval-{cfg.split}-{tta.describe().replace(' @ ', '@').replace(',', '-')}")
    cfg = dataclasses.replace(cfg, out=out, sizes=tta.sizes)
    if cfg.sweep:
        return _evaluate_sweep(args, cfg)
    s = evaluate_models(cfg, progress=not args.no_progress)
    m, ci = s["metrics"], s["intervals"]
    if args.json:
        _say_scored(s["scored_images"])
        _print_json({**s, "out": out})
        return 1 if s["skipped"] else 0

    def fmt(k):
        lo_hi = ci.get(k)
        return f"{m[k]:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")

    _say_scored(s["scored_images"])
    print(f"{s['n']} images, {s['tta']['spec']} ({s['tta']['views']} views), {len(cfg.models)} model(s)")
    for k in ("top1", "top5", "mean_per_class", "ece", "many_shot", "medium_shot", "few_shot"):
        if m.get(k) is not None:
            print(f"  {k:15s} {fmt(k)}")
    say_sets(s)
    for pair in s["most_confused"][:3]:
        print(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']}x)")
    print(f"-> {out}")
    if s["skipped"]:
        skipped = [(item["path"], item["reason"]) for item in s["skipped"]]
        _skipped_summary(skipped, s["n"] + len(skipped), os.path.join(out, "metrics.json"))
    for note in s.get("engines", []):
        _stderr(f"finegrain: engine at {note}")
    return 1 if s["skipped"] else 0


def _evaluate_sweep(args: argparse.Namespace, cfg) -> int:
    from finegrain.evaluate.evaluation import evaluate_sweep

    say = (lambda line: None) if args.json else print
    rows = evaluate_sweep(cfg, progress=not args.no_progress, say=say)
    if args.json:
        _print_json({"tta": cfg.tta, "sizes": rows, "out": cfg.out})
    say(f"-> {cfg.out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from finegrain.config import ExplainConfig
    from finegrain.evaluate.predictor import load
    from finegrain.explain.files import explain_files

    args = _cli_config(ExplainConfig, args, _overrides(args, ExplainConfig), config_choices(ExplainConfig))
    if not args.out:
        raise FinegrainError("explain needs --out FOLDER (or out: in --config) for the overlays")
    predictor = load(args.model, device=args.device)
    _, skipped = explain_files(predictor, args.images, args.out, method=args.method, target=args.target,
                               layer=args.layer, threshold=args.threshold)  # fmt: skip
    listed = os.path.join(args.out, "explanations.json")
    if len(skipped) == len(args.images):
        raise FinegrainError(f"nothing explained, all {len(skipped)} input(s) skipped (listed in {listed})")
    if skipped:
        _skipped_summary(skipped, len(args.images), listed)
    return 1 if skipped else 0


def cmd_fixres(args: argparse.Namespace) -> int:
    from finegrain.config import FixresConfig
    from finegrain.evaluate.fixres import fix_resolution, fixres_samples, save_predictor
    from finegrain.evaluate.predictor import load

    args = _cli_config(FixresConfig, args, _overrides(args, FixresConfig), config_choices(FixresConfig))
    if args.size is None or not args.out:
        raise FinegrainError("fixres needs --size (the new test resolution, e.g. 288) and --out FOLDER")
    if args.split in ("test", "all"):
        raise FinegrainError(
            f"fixres fits BatchNorm statistics and the head on --split {args.split}, whose images must stay unseen "
            "for an honest test score: use --split train (the default) or val"
        )
    predictor = load(args.model, device=args.device)
    paths, labels = fixres_samples(args.model, args.data, args.split, predictor.classes)
    fixed = fix_resolution(
        predictor,
        paths,
        labels,
        args.size,
        head_epochs=args.head_epochs,
        head_lr=args.head_lr,
        bn_layers=args.bn_layers,
        max_images=args.max_images,
        seed=args.seed,
    )
    save_predictor(fixed, args.out)
    info = fixed.meta["fixres"]
    print(
        f"adapted to {args.size}px: BatchNorm statistics from {info['bn_images']} images, "
        f"head fine-tuned {info['head_epochs']} epochs -> {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finegrain.config import ReportConfig
    from finegrain.report.run_report import build_run_report

    cfg = build_config(ReportConfig, yaml_path=args.config, overrides=_overrides(args, ReportConfig),
                       choices=config_choices(ReportConfig))  # fmt: skip
    path = build_run_report(cfg.run, data=cfg.data, out=cfg.out, split=cfg.split, tta=cfg.tta, gallery=cfg.gallery,
                            progress=not args.no_progress, allow_train_images=cfg.allow_train_images)  # fmt: skip
    print(f"report -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`fit` on the bundled sample (2 minutes), then the chosen model predicts three of its test images."""
    from finegrain.config import DemoConfig
    from finegrain.evaluate.predictor import load
    from finegrain.recipe import FitConfig, fit

    progress = not args.no_progress
    args = build_config(DemoConfig, yaml_path=args.config, overrides=_overrides(args, DemoConfig))
    data = args.data or _default_demo_data()
    out = os.path.join(args.out, "fit")
    result = fit(FitConfig(data=data, out=out, budget_min=args.budget_min, workers=0), progress=progress)
    model = load(os.path.join(out, "model"))
    test_dir = os.path.join(data, "test")
    examples = sorted(os.path.join(d, f) for d, _, files in os.walk(test_dir) for f in files if f.endswith(".jpg"))
    for path, top in zip(examples[::15][:3], model.predict(examples[::15][:3], k=2)):
        print(f"  {os.path.relpath(path, data)} -> " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    m = result.test["metrics"] if result.test else None
    score = f"test top-1 {m['top1']:.3f}, mean per-class {m['mean_per_class']:.3f}" if m else "no test split"
    print(f"demo: fit chose {result.chosen.name}: {score}; model in {os.path.join(out, 'model')}")
    return 0


def _default_demo_data() -> str:
    """The bundled sample: package data of finegrain, so a wheel install has it too."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "_demo", "birds10")
    if os.path.isdir(path):
        return path
    raise FinegrainError("demo data not found in the installed package: pass --data FOLDER")


def cmd_backbones(args: argparse.Namespace) -> int:
    from finegrain.backbones import list_backbones

    for name in list_backbones():
        print(name)
    print("(any timm model name or hf-hub:org/name works too where a network exists)")
    return 0
