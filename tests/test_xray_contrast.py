"""Local contrast normalisation of radiographs (``preprocessing.local_contrast_mm``):
what the X-ray models trained on the mm grid see, the same in training and in the
pipelines."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from spine_node.inference.errors import PipelineError
from spine_node.inference.pipelines.xray import (
    LOCAL_CONTRAST_SPAN,
    _contrast_px,
    _gaussian_blur,
    _grid_mm,
    local_contrast,
    window,
)


def _card(preprocessing: dict) -> SimpleNamespace:
    """What :func:`_contrast_px` reads of a model card."""
    return SimpleNamespace(name="xray-test-model", preprocessing=preprocessing)


def _edges(shape: tuple[int, int] = (96, 80)) -> np.ndarray:
    """Bright 12-pixel blocks 4 pixels apart down the middle: a column of 'bodies'."""
    image = np.zeros(shape, np.float32)
    for top in range(8, shape[0] - 12, 16):
        image[top:top + 12, 30:50] = 1.0
    return image


def test_blur_is_a_gaussian_with_zeros_outside() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    image = rng.random((37, 29)).astype(np.float32)
    for sigma in (1.0, 3.0, 6.5):
        expected = ndimage.gaussian_filter(image, sigma, mode="constant", cval=0.0, truncate=3.0)
        assert np.allclose(_gaussian_blur(image, sigma), expected, atol=1e-5)


def test_smooth_thickness_and_exposure_drop_out() -> None:
    """The same column over a steep thickness ramp, at another exposure: the plain window
    changes the blocks' contrast, local contrast keeps it."""
    bodies = _edges()
    ramp = np.linspace(0.0, 6.0, bodies.shape[1], dtype=np.float32)[None, :] * np.ones_like(bodies)
    thick = 0.2 * bodies + ramp
    brighter = 3.0 * thick + 40.0
    plain_a, plain_b = window(bodies), window(thick)
    inner = (slice(10, 86), slice(20, 60))
    # The plain window: the blocks' step is a small part of the ramp's range.
    assert np.ptp(plain_a[inner]) > 0.9 and np.abs(plain_a - plain_b)[inner].max() > 0.3
    local_a = window(bodies, contrast_px=6.0)
    local_b = window(thick, contrast_px=6.0)
    local_c = window(brighter, contrast_px=6.0)
    assert np.abs(local_a - local_b)[inner].mean() < 0.05
    assert np.allclose(local_b, local_c, atol=1e-3)
    # Blocks brighter than their surroundings, gaps darker.
    assert local_a[14, 40] > 0.6 and local_a[22, 40] < 0.4


def test_the_edge_of_the_imaged_field_is_not_an_edge() -> None:
    """A flat image with a trimmed (not imaged) border: every imaged pixel reads 0.5."""
    image = np.full((64, 64), 0.7, np.float32)
    valid = np.zeros(image.shape, bool)
    valid[:, 20:] = True
    out = local_contrast(image, valid, 5.0)
    assert np.allclose(out[valid], 0.5, atol=1e-4)
    assert (out[~valid] == 0).all()
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_a_pixel_one_local_sd_up_maps_by_the_span() -> None:
    rng = np.random.default_rng(5)
    noise = rng.normal(0.5, 0.1, (200, 200)).astype(np.float32)
    out = local_contrast(noise, np.ones(noise.shape, bool), 8.0)
    # For white noise the local z-score has unit spread: the output's spread is 1 / span.
    assert abs(float(out[20:-20, 20:-20].std()) - 1.0 / LOCAL_CONTRAST_SPAN) < 0.03


def test_card_scale_in_model_pixels_and_bad_values() -> None:
    assert _contrast_px(_card({"local_contrast_mm": 6.0}), 2.0) == 3.0
    assert _contrast_px(_card({}), 1.0) is None
    assert _contrast_px(_card({"local_contrast_mm": 6.0}), None) is None
    for bad in ("wide", 0.01, 500):
        with pytest.raises(PipelineError, match="local_contrast_mm"):
            _contrast_px(_card({"local_contrast_mm": bad}), 1.0)
    # The grid is checked the same way.
    assert _grid_mm(_card({"grid_mm": 2})) == 2.0 and _grid_mm(_card({})) is None
    for bad in ("fine", 0.001, 50):
        with pytest.raises(PipelineError, match="grid_mm"):
            _grid_mm(_card({"grid_mm": bad}))
