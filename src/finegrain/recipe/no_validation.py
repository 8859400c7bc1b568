"""fit when no validation is possible: every class has a single training image (one-shot data), so no image of a
class can be held out to score a candidate on. fit then makes one documented choice instead of a measured one, and
says so in its reason and fit.json:

- labelled images only: nearest class mean on centred + L2-normalised (CL2N) GeM features of the 256 px full-frame +
  flip view. With one image a class the class mean is that image, so this is 1-NN under CL2N; SimpleShot (Wang et
  al. 2019, arXiv:1911.04623) found CL2N nearest-centroid the strongest simple few-shot rule, ahead of a linear
  classifier trained on so few images (BENCHMARKS.md's 1-shot rows agree: probe 0.462, NCM / 1-NN 0.532);
- with unlabeled images (`--unlabeled`): label propagation with the literature's defaults (Iscen et al. 2019;
  semi/propagation.py) on the same view, which BENCHMARKS.md's unlabeled table measured at one image a class.
"""

from __future__ import annotations

from finegrain.recipe.candidates import NO_VAL_HEAD, Candidate

NO_VAL_VIEW, NO_VAL_POOLING, NO_VAL_SEMI = "full256-flip", "gem", "lp-l2"
NO_VAL_SELECTION = "none: no validation possible (every class has a single training image); a documented choice"


def choose_without_validation(frozen, n_labelled: int, upaths: list[str]) -> tuple[Candidate, str]:
    """The documented choice (features of its view extracted now) and the reason fit states for it."""
    import time

    t0 = time.perf_counter()
    frozen._store(NO_VAL_VIEW)  # train features (resumable): the final model refits on them
    semi = bool(upaths)
    head = NO_VAL_SEMI if semi else NO_VAL_HEAD[0]
    params = {"view": NO_VAL_VIEW, "pooling": NO_VAL_POOLING, "head": head, "source": f"{NO_VAL_VIEW}/gem",
              "spi": frozen.spi.get(NO_VAL_VIEW, 0.0)}  # fmt: skip
    cand = Candidate(f"{NO_VAL_VIEW}/{NO_VAL_POOLING}/{head}", "semi" if semi else "frozen", None, None,
                     time.perf_counter() - t0, params, estimate="none")  # fmt: skip
    rule = (
        f"label propagation (literature defaults) over the {len(upaths)} unlabeled images"
        if semi
        else "nearest class mean on CL2N features (1-NN to each class's image; SimpleShot)"
    )
    reason = (
        f"no validation possible: each of the {n_labelled} training images is its class's only one, so no "
        f"candidate can be scored; fit's documented choice without validation: {rule}, GeM features of the 256 px "
        "full-frame + flip view (recipe/no_validation.py says why)"
    )
    return cand, reason
