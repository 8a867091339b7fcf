"""The conformance suite as pytest tests, one per (backend, case):

    pytest --pyargs flashdispatch.conformance                       # an installed flashdispatch
    PYTHONPATH=src pytest src/flashdispatch/conformance             # in the repository

Which backends, device, tier and dtypes come from the FLASHDISPATCH_VERIFY_* environment
variables (see `flashdispatch.conformance`), because pytest options do not reach a module run
with --pyargs. Plugins are loaded as usual, so a plugin's backends are checked with the built-in
ones; `FLASHDISPATCH_VERIFY_BACKENDS=mybackend` checks one.
"""

from __future__ import annotations

import pytest
import torch

from flashdispatch.conformance import ENV_DEVICE, cases, check_case, resolve_backends, resolve_device, settings_from_env

SETTINGS = settings_from_env()
DEVICE = resolve_device(SETTINGS["device"])


def _params():
    params = []
    for backend in resolve_backends(SETTINGS["backends"]):
        for case in cases(backend, SETTINGS["tier"], DEVICE, SETTINGS["dtypes"]):
            params.append(pytest.param(backend, case, id=f"{backend.name}-{case.id}"))
    return params


@pytest.mark.parametrize("backend, case", _params())
def test_conformance(backend, case):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{ENV_DEVICE} asks for {DEVICE}, but torch sees no CUDA GPU")
    result = check_case(backend, case, DEVICE)
    if result.skipped and result.skipped_by == "suite":
        pytest.skip(result.reason)
    if result.skipped:
        pytest.skip(f"{backend.name} does not support this case: {result.reason}")
    assert result.passed, result.message()
