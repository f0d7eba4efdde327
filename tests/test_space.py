"""ModelSpace: the one conversion between user space (degrees, ERA5 units) and model space."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.normalize import Normalizer
from ingest.region import MEMPHIS as R
from ingest.space import UNITS, DomainError, ModelSpace, check_physical

SPACE = ModelSpace(R, Normalizer.reference())


def test_round_trips_through_a_dict_and_a_checkpoint_layout():
    d = SPACE.to_dict()
    assert set(d) == {"region", "normalizer"} and ModelSpace.from_dict(d) == SPACE


def test_values_round_trip_exactly_enough_and_coordinates_match_the_region():
    rng = np.random.default_rng(0)
    era5 = np.c_[rng.uniform(9.5e4, 1.03e5, 50), rng.uniform(250, 300, 50), rng.normal(0, 5, (50, 2))]
    np.testing.assert_allclose(SPACE.to_era5(SPACE.to_normalised(era5)), era5, rtol=1e-6, atol=1e-4)
    xy = SPACE.xy(R.circle_lat, R.circle_lon)
    assert xy.dtype == np.float32 and np.abs(np.hypot(*xy.T)).max() < 10


def test_log_jacobians_name_their_units_and_differ_by_ln_1000():
    assert SPACE.log_jacobian("model") == pytest.approx(-Normalizer.reference().log_std_sum)
    assert SPACE.log_jacobian("era5") - SPACE.log_jacobian("model") == pytest.approx(np.log(1e-3))
    assert SPACE.log_jacobian("normalised") == 0.0
    assert SPACE.log_density(1.0, 10, "era5") == pytest.approx(1.0 + 10 * SPACE.log_jacobian("era5"))
    assert "ERA5" in UNITS["era5"] and "kPa" in UNITS["model"]
    with pytest.raises(ValueError, match="units"):
        SPACE.log_jacobian("hPa")  # type: ignore[arg-type]


def test_circle_targets_are_the_circle_minus_the_context():
    lat, lon = SPACE.circle_targets(R.circle_lat[:100] + 1e-9, R.circle_lon[:100])  # matched to 6 decimals
    assert lat.size == R.n_points - 100
    np.testing.assert_array_equal(lat, R.circle_lat[100:])


@pytest.mark.parametrize("lat, lon, code", [((35.0,), (-91.0 + 360,), "longitude_0_360"),
                                             ((-91.0,), (35.0,), "swapped_coordinates"),
                                             ((39.9,), (-95.9,), "out_of_region")])
def test_domain_errors_carry_the_services_codes(lat, lon, code):
    SPACE.check_points([35.0], [-91.0])
    with pytest.raises(DomainError) as e:
        SPACE.check_points(lat, lon, "targets")
    assert e.value.code == code and isinstance(e.value, ValueError) and e.value.message.startswith("targets:")


def test_physical_ranges_in_era5_units_with_a_hint():
    check_physical("t2m", [280.0])
    with pytest.raises(DomainError, match="degrees Celsius") as e:
        check_physical("t2m", [5.0, 20.0])  # degrees Celsius sent as kelvin
    assert e.value.code == "out_of_physical_range"
    with pytest.raises(DomainError) as e:
        ModelSpace.check_values(np.array([[np.nan, 280.0, 0.0, 0.0]]))
    assert e.value.code == "non_finite"
