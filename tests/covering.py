"""Deterministic covering samples of a test matrix (test-only helper).

``pairwise(axes)`` returns combinations (dicts) such that every pair of values of any two axes occurs in at
least one of them (greedy all-pairs, ties broken by the order of the axes and values, so the sample never
changes between runs); ``allowed(combo)`` may exclude combinations the API refuses, in which case pairs only
reachable through refused combinations are not required.
"""

import itertools


def pairwise(axes: dict, allowed=lambda combo: True) -> list:
    names = list(axes)
    every = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
    every = [c for c in every if allowed(c)]

    def pairs(c):
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    missing = set().union(*(pairs(c) for c in every)) if every else set()
    chosen = []
    while missing:
        best = max(every, key=lambda c: len(pairs(c) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen
