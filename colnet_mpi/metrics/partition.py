"""Agreement between two partitions of the same items (numpy only: the report tools use it
without loading torch)."""

from __future__ import annotations

import numpy as np

__all__ = ["adjusted_rand"]


def adjusted_rand(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index between two labelings of the same items (1.0 = same partition).

    Counted over unordered pairs of items: ``tp`` pairs together in both, ``fn`` together only in
    ``labels_true``, ``fp`` only in ``labels_pred``, ``tn`` apart in both; the index is
    ``2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))``, 1.0 when ``fn = fp = 0``
    (this includes fewer than two items). Exact integer arithmetic up to the one final division,
    so the value equals scikit-learn's ``adjusted_rand_score`` to the last bit.
    """
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.ndim != 1 or p.ndim != 1 or t.shape != p.shape:
        raise ValueError(
            f"labels must be two one-dimensional arrays of equal length, got shapes "
            f"{t.shape} and {p.shape}"
        )
    _, t_ids = np.unique(t, return_inverse=True)
    _, p_ids = np.unique(p, return_inverse=True)
    cells = np.unique(
        t_ids.astype(np.int64) * (int(p_ids.max(initial=0)) + 1) + p_ids, return_counts=True
    )[1]

    def pairs(counts: np.ndarray) -> int:
        return sum(int(c) * (int(c) - 1) // 2 for c in counts)

    together = pairs(cells)
    true_pairs = pairs(np.bincount(t_ids))
    pred_pairs = pairs(np.bincount(p_ids))
    total = t.size * (t.size - 1) // 2
    tp, fn, fp = together, true_pairs - together, pred_pairs - together
    tn = total - true_pairs - pred_pairs + together
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
