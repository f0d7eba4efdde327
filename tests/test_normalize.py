import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from ingest.normalize import Normalizer, StatsAccumulator, quantize_float16
from ingest.variables import era5_to_model, model_to_era5

physical = arrays(
    np.float64, st.tuples(st.integers(1, 5), st.just(4)),
    elements=st.floats(-60.0, 110.0, allow_nan=False, allow_infinity=False),
)


@given(physical)
def test_normalise_round_trip(values):
    n = Normalizer.reference()
    back = n.denormalize(n.normalize(values))
    np.testing.assert_allclose(back, values, rtol=4e-16, atol=4 * np.spacing(110.0))


@given(physical)
def test_units_round_trip(values):
    back = era5_to_model(model_to_era5(values))
    np.testing.assert_allclose(back, values, rtol=0, atol=4 * np.spacing(400.0))


def test_unit_conversions_are_the_ones_we_mean():
    era5 = np.array([[101325.0, 273.15, 3.0, -4.0]])
    np.testing.assert_allclose(era5_to_model(era5), [[101.325, 0.0, 3.0, -4.0]])


def test_reference_constants_and_log_std():
    n = Normalizer.reference()
    assert n.mean == (100.1209, 7.4628, 0.0, 0.0) and n.std == (1.4738, 8.5286, 3.4162, 3.4162)
    assert n.log_std_sum == pytest.approx(4.988, abs=5e-4)  # docs/protocol.md §4


def test_accumulator_matches_numpy_and_merges_exactly():
    rng = np.random.default_rng(0)
    a = rng.normal([100.0, 5.0, 1.0, -1.0], [1.5, 8.0, 3.0, 3.0], size=(5000, 4))
    b = rng.normal([101.0, 2.0, 0.0, 0.0], [1.0, 6.0, 2.0, 2.0], size=(3000, 4))
    acc = StatsAccumulator().update(a).merge(StatsAccumulator().update(b))
    both = np.concatenate([a, b])
    np.testing.assert_allclose(acc.mean, both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.std, both.std(0), rtol=1e-10)
    assert acc.mean_speed == pytest.approx(np.hypot(both[:, 2], both[:, 3]).mean(), rel=1e-12)
    norm = acc.normalizer()
    # sp, t2m standardised; winds scaled by mean speed, not centred
    assert norm.mean[2:] == (0.0, 0.0) and norm.std[2] == norm.std[3] == pytest.approx(acc.mean_speed)
    z = norm.normalize(both)
    np.testing.assert_allclose(z[:, :2].mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-10)
    assert StatsAccumulator.from_dict(acc.to_dict()).to_dict() == acc.to_dict()


def test_normalizer_dict_round_trip_and_validation():
    n = StatsAccumulator().update(np.random.default_rng(1).normal(size=(100, 4)) + 100).normalizer()
    assert Normalizer.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="positive"):
        Normalizer((0.0,) * 4, (1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="mean 0"):
        Normalizer((0.0, 0.0, 1.0, 0.0), (1.0,) * 4)
    with pytest.raises(ValueError, match="no values"):
        StatsAccumulator().normalizer()


def test_float16_parity_quantises_pressure_to_62_5_pa():
    sp = np.array([100.01, 100.03, 100.05])  # kPa
    q = quantize_float16(sp)
    assert np.all(np.abs(q - sp) <= 0.0625 / 2 + 1e-7)
    assert len(np.unique(q)) < 3
