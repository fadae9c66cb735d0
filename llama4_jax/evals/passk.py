"""pass@k for code tasks: run every completion in the sandbox, then the unbiased estimator.

With n completions of which c pass, pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al. 2021): the
probability that k completions drawn without replacement from the n include a passing one. It
is computed as a product so large n does not overflow. k > n is undefined and refused.
"""

from __future__ import annotations

from typing import Sequence

from .sandbox import Containment, Limits, check_completion


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0  # C(n−c, k) / C(n, k) = Π_{i=n−c+1..n} (1 − k/i)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def score_doc(doc: dict, completions: Sequence[str], ks: Sequence[int], limits: Limits = Limits(),
              plan: Containment | None = None) -> dict[str, float]:
    """One HumanEval-style doc (prompt, test, entry_point) and its n completions →
    {"pass@k": value} for each k ≤ n."""
    n = len(completions)
    c = sum(check_completion(doc["prompt"], comp, doc["test"], doc["entry_point"], limits, plan).passed
            for comp in completions)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}
