"""The stored golden files are what the reference implementation gives today (reference extra)."""

import numpy as np
import pytest

from stable_diffusion.testing import FAMILIES


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("component", ["tokenizer", "clip", "unet", "vae", "pipeline"])
def test_golden_file_is_current(component, family, tiny_model, golden, reference):
    module = reference(component)
    live = getattr(module, f"reference_{component}")(tiny_model(family), family)
    stored = golden(component, family)
    assert sorted(live) == sorted(stored)
    for key in live:
        if live[key].dtype.kind in "USbiu":  # prompts, token ids: exactly
            assert np.array_equal(live[key], stored[key]), key
        else:
            # The reference's own float32 results move by up to 1.5e-5 between CPUs (its AVX2 and
            # AVX-512 kernels sum in other orders): measured on the whole-run goldens. Half the
            # parity bound (1e-4) still catches a reference that changed.
            np.testing.assert_allclose(live[key], stored[key], atol=5e-5, err_msg=f"{component}/{key}")
