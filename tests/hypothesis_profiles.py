"""Hypothesis profiles for the property tests: "ci" (few, derandomized examples, no deadline) unless HYPOTHESIS_PROFILE says "dev"."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                     HealthCheck.differing_executors], print_blob=True)

# CI: small and reproducible (derandomized: the same examples every run, so a red CI is never a flake).
settings.register_profile("ci", max_examples=12, derandomize=True, database=None, **_COMMON)
# Local hunting: many random examples; failing ones are kept in the example database and replayed first.
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
