"""Streaming linear probe: mini-batch multinomial logistic regression over a memory-mapped store, bounded memory.

For stores larger than memory (iNaturalist: 2.7M x 1280 float32 = 13.8 GB a pooling), where the full-batch L-BFGS
probe (heads/probe.py) cannot hold X. The objective is the L-BFGS probe's: mean cross-entropy + ||W||^2 / (2 C N)
on standardized features, C chosen on a stratified validation split of the training rows, then a refit on all of
them. X is read in chunks of `chunk_rows` rows (any [N, D] array, np.memmap or `StoreRows` view), shuffled chunk by
chunk; at most `chunk_rows` rows of X are held at once, the number recorded in `max_rows_held_`. Launched by
torchrun (a process group initialised), each rank reads its share of the chunks and DDP averages the gradients.
"""

from __future__ import annotations

import gc
import math
import numbers
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.data.splits import stratified_split
from finegrain.errors import FinegrainError
from finegrain.heads.checks import fit_data, predict_data
from finegrain.heads.index import dense_fits
from finegrain.heads.knn import check_labels
from finegrain.heads.probe import DEFAULT_CS
from finegrain.heads.select import best_of

SOLVERS = ("auto", "lbfgs", "stream")  # auto: stream once the training features pass 2 GiB or a quarter of RAM


class StoreRows:
    """A lazy [len(rows), D] view of selected rows of a memory-mapped [R, D] matrix: slicing reads only those rows."""

    def __init__(self, features: np.ndarray, rows: np.ndarray) -> None:
        self.features, self.rows = features, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), features.shape[1])
        self.ndim = 2

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        rows = self.rows[key]
        order = np.argsort(rows, kind="stable")  # sorted reads: the memory map touches each page once
        out = np.empty((len(rows), self.shape[1]), np.float32)
        out[order] = self.features[rows[order]]
        return out


class StreamingProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression by AdamW mini-batches (warm-up + cosine schedule) over chunks of X.

    Cs: inverse L2 strengths, as in LogisticProbe (the penalty is ||W||^2 / (2 C N)); all of them are trained at
    once on the fit part of the split (at most select_rows rows) and the best validation top-1 wins.
    epochs: None -> enough for about 3,000 steps, between 2 and 100 passes. chunk_rows: rows of X read at a time.
    normalize: "l2" scales each row to unit length as it is read (the CLI's default --norm l2), None keeps X.
    device: where the mini-batches are computed ("cuda:0" under torchrun with nccl); X is read on the host.
    """

    def __init__(
        self,
        *,
        Cs: Sequence[float] = DEFAULT_CS,
        val_size: float = 0.2,
        standardize: bool = True,
        normalize: str | None = None,
        epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 2e-3,
        chunk_rows: int = 16384,
        select_rows: int = 200_000,
        random_state: int | None = 0,
        device: str = "cpu",
    ) -> None:
        self.Cs, self.val_size, self.standardize, self.normalize = Cs, val_size, standardize, normalize
        self.epochs, self.batch_size, self.lr, self.chunk_rows = epochs, batch_size, lr, chunk_rows
        self.select_rows, self.random_state, self.device = select_rows, random_state, device

    def _check_params(self) -> list[float]:
        Cs = list(self.Cs) if isinstance(self.Cs, Sequence | np.ndarray) else [self.Cs]
        if not Cs or not all(isinstance(c, numbers.Real) and c > 0 for c in Cs):
            raise ValueError(f"Cs must be a non-empty sequence of positive numbers; got {self.Cs!r}")
        if not 0 < self.val_size < 1:
            raise ValueError(f"val_size must be a fraction strictly between 0 and 1; got {self.val_size!r}")
        if self.normalize not in (None, "l2"):
            raise ValueError(f"normalize must be None or 'l2'; got {self.normalize!r}")
        for name in ("batch_size", "chunk_rows", "select_rows") + (("epochs",) if self.epochs is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")
        return sorted({float(c) for c in Cs})

    # ---- fit ----------------------------------------------------------------------------------------------------
    def fit(self, X, y: np.ndarray) -> StreamingProbe:
        """X [N, D] (an array, np.memmap or StoreRows; read in chunks), y [N] labels (at least two classes)."""
        Cs = self._check_params()
        if _on_disk(X):  # read in chunks, never whole
            if getattr(X, "ndim", 0) != 2:
                raise ValueError(f"X must be a 2-D array [N, D]; got shape {getattr(X, 'shape', None)}")
            y = check_labels(y, len(X))
            self.n_features_in_ = X.shape[1]
        else:  # in memory: scikit-learn's input checks (heads/checks.py)
            X, y = fit_data(self, X, y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"a logistic probe needs at least 2 classes; y has {len(self.classes_)} class")
        self.max_rows_held_ = 0
        self.mean_, self.scale_ = self._moments(X)
        train, val = stratified_split(codes, test_size=self.val_size, seed=self.random_state, min_test=0)
        if len(Cs) > 1 and len(val):
            rng = np.random.default_rng(self.random_state)
            fit_rows = np.sort(rng.permutation(train)[: self.select_rows])
            W, b, _ = self._train(X, codes, fit_rows, Cs)
            self.val_scores_ = dict(zip(Cs, self._accuracy(X, codes, np.sort(val), W, b)))
            self.C_ = best_of(Cs, self.val_scores_)  # the one rule (heads/select.py); ties: the stronger penalty
        else:
            self.val_scores_, self.C_ = dict.fromkeys(Cs, math.nan), Cs[len(Cs) // 2]
        W, b, self.loss_curve_ = self._train(X, codes, np.arange(len(X)), [self.C_])
        self.coef_ = (W[0].T / self.scale_).astype(np.float64)  # [C, D] on raw (normalised) rows
        self.intercept_ = (b[0] - self.coef_ @ self.mean_).astype(np.float64)
        return self

    def _chunks(self, X, rows: np.ndarray, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in rows, X[rows[positions]] as float32) chunk by chunk, in `order` of chunks."""
        n_chunks = max(1, math.ceil(len(rows) / self.chunk_rows))
        for c in range(n_chunks) if order is None else order:
            pos = np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, len(rows)))
            block = np.array(X[rows[pos]], dtype=np.float32)
            _release_pages(X)
            self.max_rows_held_ = max(self.max_rows_held_, len(block))
            if self.normalize == "l2":
                block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            yield pos, block

    def _moments(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean [D] and standard deviation [D] in one streaming pass (float64 sums)."""
        d = X.shape[1]
        if not self.standardize:
            return np.zeros(d, np.float32), np.ones(d, np.float32)
        sums = torch.zeros(2, d, dtype=torch.float64)
        for _, block in self._chunks(X, np.arange(len(X))):
            b64 = torch.from_numpy(block).double()
            sums[0] += b64.sum(0)
            sums[1] += (b64 * b64).sum(0)
        mean = sums[0] / len(X)
        std = (sums[1] / len(X) - mean**2).clamp_min(0).sqrt()
        return mean.float().numpy(), torch.where(std > 1e-6, std, 1.0).float().numpy()

    def _n_epochs(self, n_rows: int, world: int) -> int:
        if self.epochs is not None:
            return self.epochs
        steps = max(1, n_rows // (self.batch_size * world))
        return int(min(100, max(2, math.ceil(3000 / steps))))

    def _train(self, X, codes: np.ndarray, rows: np.ndarray, Cs: list[float]):
        """Train one linear model per C on X[rows] at once; returns (W [K, D, C], b [K, C], mean loss per epoch)."""
        rank, world = _dist_rank_world()
        seed = 0 if self.random_state is None else int(self.random_state)
        gen = torch.Generator().manual_seed(seed + 7919 * rank)  # rows within a chunk: each rank its own stream
        dev = torch.device(self.device)
        model = _Linear(len(Cs), X.shape[1], len(self.classes_)).to(dev)
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        lam = torch.tensor([1.0 / (C * len(rows)) for C in Cs], device=dev)
        epochs = self._n_epochs(len(rows), world)
        steps = max(1, len(rows) // (self.batch_size * world))  # the same number on every rank: DDP stays in step
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        sched = _warmup_cosine(opt, epochs * steps)
        mean, scale = torch.from_numpy(self.mean_).to(dev), torch.from_numpy(self.scale_).to(dev)
        n_chunks, curve = max(1, math.ceil(len(rows) / self.chunk_rows)), []
        for epoch in range(epochs):
            total, seen = 0.0, 0
            order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
            mine = order[rank::world] if n_chunks >= world else order  # the same order on every rank, split
            for xb, yb in self._batches(X, codes, rows, gen, mine, steps):
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                logits = net((xb - mean) / scale)  # [K, B, C]
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), yb.repeat(len(Cs)), reduction="none")
                ce = ce.view(len(Cs), -1).mean(1)
                loss = (ce + 0.5 * lam * model.weight.pow(2).sum((1, 2))).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, seen = total + ce[0].item() * len(yb), seen + len(yb)
            curve.append(total / max(seen, 1))
        if net is not model:  # DDP's reducer sits in reference cycles: free it (and its hold on the process group)
            del net  # now, while the interpreter is whole, not at exit
            gc.collect()
        return model.weight.detach().cpu().numpy(), model.bias.detach().cpu().numpy(), curve

    def _batches(self, X, codes, rows, gen, mine: np.ndarray, steps: int):
        """`steps` shuffled mini-batches from this rank's chunks `mine` (cycled if needed), rows shuffled."""
        done = 0
        while done < steps:
            for pos, block in self._chunks(X, rows, mine):
                perm = torch.randperm(len(pos), generator=gen)
                xs, ys = torch.from_numpy(block)[perm], torch.from_numpy(codes[rows[pos]])[perm]
                for s in range(0, len(perm), self.batch_size):
                    yield xs[s : s + self.batch_size], ys[s : s + self.batch_size]
                    done += 1
                    if done == steps:
                        return

    def _accuracy(self, X, codes, rows, W: np.ndarray, b: np.ndarray) -> list[float]:
        """Validation top-1 [K] of each of the K models (every rank scores every row: the same answer on all)."""
        correct = torch.zeros(len(W), dtype=torch.float64)
        Wt, bt = torch.from_numpy(W), torch.from_numpy(b)
        mean, scale = torch.from_numpy(self.mean_), torch.from_numpy(self.scale_)
        for pos, block in self._chunks(X, rows):
            logits = torch.einsum("nd,kdc->knc", (torch.from_numpy(block) - mean) / scale, Wt) + bt[:, None]
            correct += (logits.argmax(2) == torch.from_numpy(codes[rows[pos]])).sum(1).double()
        return (correct / len(rows)).tolist()

    # ---- predict ------------------------------------------------------------------------------------------------
    def logits(self, X) -> np.ndarray:
        """X [M, D] -> logits [M, C], computed chunk by chunk."""
        check_is_fitted(self, "coef_")
        if not _on_disk(X):
            X = predict_data(self, X)
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.n_features_in_}")
        out = np.empty((len(X), len(self.classes_)), np.float64)
        for pos, block in self._chunks(X, np.arange(len(X))):
            out[pos] = block.astype(np.float64) @ self.coef_.T + self.intercept_
        return out

    def decision_function(self, X) -> np.ndarray:
        """`logits` as scikit-learn's classifiers give them: with two classes one score a row [M], > 0 for the
        second class."""
        logits = self.logits(X)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X) -> np.ndarray:
        """X [M, D] -> class probabilities [M, C], columns in the order of classes_."""
        return softmax(self.logits(X), axis=1)

    def predict(self, X) -> np.ndarray:
        """X [M, D] -> predicted labels [M]."""
        scores = self.logits(X)  # first, so an unfitted probe raises NotFittedError
        return self.classes_[np.argmax(scores, axis=1)]


class _Linear(torch.nn.Module):
    """K independent linear models: [B, D] -> logits [K, B, C]."""

    def __init__(self, k: int, d: int, c: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(k, d, c))
        self.bias = torch.nn.Parameter(torch.zeros(k, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,kdc->kbc", x, self.weight) + self.bias[:, None]


def _on_disk(X) -> bool:
    """A store's rows or a memory map: read chunk by chunk; anything else is checked and held in memory."""
    return isinstance(X, StoreRows | np.memmap)


def _release_pages(X) -> None:
    """Unmap the store pages a chunk read touched: the page cache keeps them, this process's RSS does not, so the
    resident memory stays one chunk however large the memory-mapped store is."""
    import mmap

    mm = getattr(X, "_mmap", None) or getattr(getattr(X, "features", None), "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _warmup_cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def choose_solver(solver: str, n_rows: int, dim: int) -> str:
    """lbfgs | stream for `solver` (auto: stream when [n_rows, dim] float32 passes 2 GiB or RAM / 4)."""
    if solver not in SOLVERS:
        raise FinegrainError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if solver != "auto":
        return solver
    return "lbfgs" if dense_fits(n_rows, dim) else "stream"


def lazy_splits(store, pooling: str, *, train_split: str, test_split: str | None, test_size: float, seed: int):
    """Like evaluate's train_test_from_store, features left on disk: ((X, y, paths) train, (X, y, paths) test, name);
    each X a StoreRows view of the store's memory map."""
    index = store.index()
    feats = store.features(pooling)
    by_split: dict[str, list[int]] = {}
    for i, e in enumerate(index):
        by_split.setdefault(e.split, []).append(i)

    def part(ids) -> tuple[StoreRows, np.ndarray, list[str]]:
        ids = list(ids)
        return (StoreRows(feats, np.array([index[i].row for i in ids], np.int64)),
                np.array([index[i].label for i in ids]), [index[i].path for i in ids])  # fmt: skip

    if sorted(by_split) == ["all"]:
        y = np.array([e.label for e in index])
        tr, te = stratified_split(y, test_size=test_size, seed=seed)
        return part(tr), part(te), f"holdout of 'all' (test_size={test_size}, seed={seed})"
    test_split = test_split or next((s for s in ("test", "val") if s in by_split and s != train_split), None)
    for name in (train_split, test_split):
        if name not in by_split:
            raise FinegrainError(f"split {name!r} is not in {store.root}; splits here: {', '.join(sorted(by_split))}")
    return part(by_split[train_split]), part(by_split[test_split]), test_split


__all__ = ["SOLVERS", "StoreRows", "StreamingProbe", "choose_solver", "lazy_splits"]
