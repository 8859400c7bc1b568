"""One function per subcommand: config in, library calls, files and a short summary out."""

from __future__ import annotations

import argparse
import os

from finegrain.config import EvalConfig, ExtractConfig, build_config, config_dict, save_config
from finegrain.errors import FinegrainError


def _overrides(args: argparse.Namespace, cls) -> dict:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = build_config(ExtractConfig, yaml_path=args.config, overrides=_overrides(args, ExtractConfig))
    return run_extract(cfg, progress=not args.no_progress)


def run_extract(cfg: ExtractConfig, *, progress: bool = True) -> int:
    from finegrain.backbones import create_backbone
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    image_set = load_image_set(cfg.data)
    backbone = create_backbone(cfg.backbone, checkpoint=cfg.checkpoint)
    backbone.preprocess = backbone.preprocess.with_geometry(cfg.image_size, cfg.crop_pct)
    result = extract_to_store(
        image_set,
        backbone,
        cfg.out,
        poolings=cfg.pooling,
        flip=cfg.flip,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        device=cfg.device,
        overwrite=cfg.overwrite,
        progress=progress,
    )
    save_config(
        cfg, cfg.out, extra={"resolved": {"precision": result.store.meta["precision"], "backbone": backbone.describe()}}
    )
    print(
        f"{result.n_images} images, {len(image_set.classes)} classes, splits {image_set.splits}: "
        f"{result.n_extracted} extracted ({result.images_per_second:.1f} img/s), {result.n_reused} reused, "
        f"{len(result.skipped)} skipped -> {cfg.out}"
    )
    for path, reason in result.skipped[:10]:
        print(f"  skipped {path}: {reason}")
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more, listed in {os.path.join(cfg.out, 'skipped.csv')}")
    return 0


def _eval_cfg(args: argparse.Namespace, classifier: str) -> EvalConfig:
    over = _overrides(args, EvalConfig)
    over["classifier"] = classifier
    return build_config(EvalConfig, yaml_path=args.config, overrides=over)


def run_eval(cfg: EvalConfig) -> dict:
    """Fit the configured classifier on the store's train split, score the test split, write the outputs."""
    from finegrain.embed import FeatureStore
    from finegrain.evaluate.representations import (
        fit_and_score,
        fitted_state,
        train_test_from_store,
        write_outputs,
    )
    from finegrain.heads import create_classifier
    from finegrain.heads.to_model import save_store_model

    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    train, test, test_name = train_test_from_store(
        store,
        pooling=pooling,
        train_split=cfg.train_split,
        test_split=cfg.test_split,
        test_size=cfg.test_size,
        seed=cfg.seed,
    )
    if cfg.classifier == "knn":
        clf = create_classifier(
            "knn", n_neighbors=cfg.k, metric=cfg.metric, weights=cfg.weights, temperature=cfg.temperature
        )
    elif cfg.classifier == "ncm":
        clf = create_classifier("ncm", metric=cfg.metric)
    else:
        clf = create_classifier(cfg.classifier, random_state=cfg.seed)
    metrics, scores, norm = fit_and_score(clf, train, test, normalizer=cfg.norm, classes=store.classes)
    name = f"{cfg.classifier}{cfg.k if cfg.classifier == 'knn' else ''}-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name.replace(":", "_"))
    extra = {k: getattr(clf, k) for k in ("C_",) if hasattr(clf, k)}
    metrics = {**metrics, "classifier": name, "test_split": test_name, "n_train": len(train.y), **extra}
    model_dir = save_store_model(
        store, clf, norm, os.path.join(out, "model"), pooling=pooling, train_X=train.X, train_y=train.y,
        extra={"normalizer_name": cfg.norm, "metrics": {k: metrics[k] for k in ("top1", "mean_per_class")}},
    )  # fmt: skip
    write_outputs(
        out,
        metrics=metrics,
        config={**config_dict(cfg), "pooling": pooling, "out": out, "backbone": store.meta["backbone"]},
        test=test,
        scores=scores,
        classes=store.classes,
        state=fitted_state(norm, clf),
    )
    print(
        f"{name}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
        f"mean per-class {metrics['mean_per_class']:.4f}  (train {len(train.y)}, test {len(test.y)}) -> {out}; "
        f"model: {model_dir}"
    )
    return metrics


def cmd_knn(args: argparse.Namespace) -> int:
    run_eval(_eval_cfg(args, "knn"))
    return 0


def cmd_ncm(args: argparse.Namespace) -> int:
    run_eval(_eval_cfg(args, "ncm"))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    run_eval(_eval_cfg(args, "probe"))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from finegrain.heads.search import search_store

    results = search_store(args.index, args.query, k=args.k, pooling=args.pooling, norm=args.norm)
    for query, hits in results.items():
        print(query)
        for rank, (score, path, label) in enumerate(hits, 1):
            print(f"  {rank:2d}  {score:.4f}  {label}  {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from finegrain.config import TrainConfig, parse_overrides
    from finegrain.train.engine import train

    over = {**parse_overrides(args.overrides), **_overrides(args, TrainConfig)}
    cfg = build_config(TrainConfig, yaml_path=args.config, overrides=over)
    result = train(cfg, progress=not args.no_progress)
    line = f"best epoch {result.best_epoch}: val top-1 {result.best_val_top1:.4f}"
    if result.test_metrics:
        t = result.test_metrics
        line += f"; test top-1 {t['top1']:.4f}, mean per-class {t['mean_per_class']:.4f}"
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"{line} -> {cfg.out}")
        for path, reason in result.skipped[:10]:
            print(f"  skipped {path}: {reason}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from finegrain.recipe import FitConfig, fit

    cfg = build_config(FitConfig, yaml_path=args.config, overrides=_overrides(args, FitConfig))
    result = fit(cfg, progress=not args.no_progress)
    line = f"chose {result.chosen.name}: val top-1 {result.chosen.val_top1:.4f}"
    if result.test:
        m = result.test["metrics"]
        line += f"; test top-1 {m['top1']:.4f}, mean per-class {m['mean_per_class']:.4f} (scored once, at the end)"
    print(f"{line}; {result.seconds / 60:.1f} min -> {os.path.join(cfg.out, 'model')}")
    print(f"  predict with: finegrain predict {os.path.join(cfg.out, 'model')} IMAGE...")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from finegrain.data import ImageDecodeError
    from finegrain.evaluate.predictor import load

    predictor = load(args.model)
    for path in args.images:
        try:
            top = predictor.predict([path], k=args.k)[0]
        except ImageDecodeError as e:
            print(f"{path}\tskipped: {e}")
            continue
        print(path + "\t" + "  ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from finegrain.evaluate.evaluation import EvaluateConfig, evaluate_models
    from finegrain.evaluate.tta import TTA

    tta = TTA.parse(args.tta, args.sizes)
    first = args.model[0].rstrip("/")
    out = args.out or os.path.join(first, f"eval-{args.split}-{tta.describe().replace(' @ ', '@').replace(',', '-')}")
    cfg = EvaluateConfig(
        models=tuple(args.model),
        data=args.data,
        out=out,
        split=args.split,
        tta=args.tta,
        sizes=tta.sizes,
        batch_size=args.batch_size,
        workers=args.workers,
        precision=args.precision,
        device=args.device,
        bootstrap=args.bootstrap,
        many=args.many,
        few=args.few,
    )
    if args.sweep:
        return _evaluate_sweep(args, cfg)
    s = evaluate_models(cfg, progress=not args.no_progress)
    m, ci = s["metrics"], s["intervals"]

    def fmt(k):
        lo_hi = ci.get(k)
        return f"{m[k]:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")

    print(f"{s['n']} images, {s['tta']['spec']} ({s['tta']['views']} views), {len(cfg.models)} model(s)")
    for k in ("top1", "top5", "mean_per_class", "ece", "many_shot", "medium_shot", "few_shot"):
        if m.get(k) is not None:
            print(f"  {k:15s} {fmt(k)}")
    for pair in s["most_confused"][:3]:
        print(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']}x)")
    for item in s["skipped"][:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    print(f"-> {out}")
    return 0


def _evaluate_sweep(args: argparse.Namespace, cfg) -> int:
    """The test-resolution sweep: one evaluation per size (each in OUT/<size>/), a table, and sweep.json."""
    import dataclasses

    from finegrain.atomic import atomic_write_json
    from finegrain.evaluate.evaluation import evaluate_models
    from finegrain.evaluate.tta import TTA

    sizes = TTA.parse("none", args.sweep).sizes
    if cfg.sizes:
        raise FinegrainError("use --sweep or --sizes, not both")
    rows = {}
    print("size  top-1   [95% interval]      mean per-class")
    for size in sizes:
        sub = dataclasses.replace(cfg, sizes=(size,), out=os.path.join(cfg.out, str(size)))
        s = evaluate_models(sub, progress=not args.no_progress)
        m, ci = s["metrics"], s["intervals"].get("top1") or [float("nan")] * 2
        rows[str(size)] = {"top1": m["top1"], "top1_ci95": ci, "mean_per_class": m["mean_per_class"]}
        print(f"{size:4d}  {m['top1']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  {m['mean_per_class']:.4f}")
    atomic_write_json(os.path.join(cfg.out, "sweep.json"), {"tta": cfg.tta, "sizes": rows})
    print(f"-> {cfg.out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from finegrain.atomic import atomic_write, atomic_write_json
    from finegrain.data import ImageDecodeError
    from finegrain.evaluate.predictor import load
    from finegrain.explain import explain_images, overlay

    predictor = load(args.model)
    os.makedirs(args.out, exist_ok=True)
    records, seen = [], set()
    for path in args.images:
        try:
            (e,) = explain_images(
                predictor, [path], method=args.method, target=args.target, layer=args.layer, threshold=args.threshold
            )
        except ImageDecodeError as err:
            print(f"{path}\tskipped: {err}")
            records.append({"path": path, "skipped": str(err)})
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        name, i = f"{stem}-{e.method}.png", 1
        while name in seen:
            name, i = f"{stem}-{i}-{e.method}.png", i + 1
        seen.add(name)
        img = overlay(e.view, e.heatmap, e.box)
        atomic_write(os.path.join(args.out, name), lambda f, img=img: img.save(f, format="PNG"))
        records.append({**e.to_dict(), "overlay": name})
        print(f"{path}\t{e.target_name} {e.probability:.3f}\tbox {e.box_original}\t-> {name}")
    atomic_write_json(os.path.join(args.out, "explanations.json"), records)
    return 0


def cmd_fixres(args: argparse.Namespace) -> int:
    from finegrain.evaluate.evaluation import samples_for_model
    from finegrain.evaluate.fixres import fix_resolution, save_predictor
    from finegrain.evaluate.predictor import load

    predictor = load(args.model)
    paths, labels, _ = samples_for_model(args.data, args.split, predictor.classes)
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
    from finegrain.report.run_report import build_run_report

    path = build_run_report(
        args.run, data=args.data, out=args.out, split=args.split, tta=args.tta, gallery=args.gallery
    )
    print(f"report -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    data = args.data or _default_demo_data()
    store = os.path.join(args.out, "store")
    # the recommended extraction (BENCHMARKS.md): GeM, 256 px full frame, flip-averaged
    cfg = ExtractConfig(data=data, out=store, pooling=("gem",), image_size=256, crop_pct=1.0, flip=True)
    run_extract(cfg, progress=not args.no_progress)
    metrics = run_eval(EvalConfig(store=store, out=os.path.join(args.out, "probe"), classifier="probe"))
    run_eval(EvalConfig(store=store, out=os.path.join(args.out, "knn1"), classifier="knn", k=1))
    print(
        f"demo: linear probe top-1 {metrics['top1']:.3f}, mean per-class {metrics['mean_per_class']:.3f}; "
        f"outputs in {args.out}"
    )
    return 0


def _default_demo_data() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (
        os.path.join(os.getcwd(), "examples", "birds10"),
        os.path.normpath(os.path.join(here, "..", "..", "..", "examples", "birds10")),
    ):
        if os.path.isdir(cand):
            return cand
    raise FinegrainError("demo data not found: run from the finegrain checkout or pass --data FOLDER")


def cmd_backbones(args: argparse.Namespace) -> int:
    from finegrain.backbones import list_backbones

    for name in list_backbones():
        print(name)
    print("(any timm model name or hf-hub:org/name works too where a network exists)")
    return 0
