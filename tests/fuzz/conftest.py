"""Hypothesis profiles of the fuzz suites (hostile inputs): a fast, reproducible CI slice, and the full run.

* ``mmx-fuzz-ci`` (the default): few examples per test, derandomized (the same examples on every
  run, so CI is reproducible), no example database written into the checkout.
* ``mmx-fuzz-full``: selected with ``MMX_FUZZ=full`` (``scripts/fuzz.sh``); many random examples.

Slow tests (each example loads a model or runs a CLI command) take a fraction of the profile's
examples, see ``FEW`` in their modules. Loading the profile here makes it the session default.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings  # noqa: E402

CI_EXAMPLES = 12
FULL_EXAMPLES = 1000

_COMMON = dict(
    deadline=None,  # timings on a shared 2-core machine are noise, and the first call of a model is slow
    database=None,  # nothing written into the checkout; failures print a reproduction blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("mmx-fuzz-ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("mmx-fuzz-full", max_examples=FULL_EXAMPLES, derandomize=False, **_COMMON)

PROFILE = "mmx-fuzz-full" if os.environ.get("MMX_FUZZ", "").lower() == "full" else "mmx-fuzz-ci"
settings.load_profile(PROFILE)


def pytest_report_header(config: pytest.Config) -> str:
    """Name the profile in pytest's header, so a log says which slice ran."""
    return f"mmx fuzz profile: {PROFILE} ({settings.get_profile(PROFILE).max_examples} examples per test)"
