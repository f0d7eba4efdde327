import numpy as np
import pytest
from hypothesis import given, strategies as st

from ingest.region import MEMPHIS, Region


def test_grid_and_circle_geometry():
    r = MEMPHIS
    assert r.lats.shape == r.lons.shape == (41,)
    assert (r.lats[0], r.lats[-1], r.lons[0], r.lons[-1]) == (30.0, 40.0, -96.0, -86.0)
    assert r.n_points == 1245
    assert r.cds_area == [40.0, -96.0, 30.0, -86.0]
    # circle: index distance from (20, 20) strictly below 20, row-major
    i, j = r.circle_index.T
    assert np.all((i - 20) ** 2 + (j - 20) ** 2 < 400)
    assert np.all(np.diff(i * 41 + j) > 0)
    # model coordinates: radius 10 ellipse in degrees, spacing 0.5, centre at 0
    xy = r.circle_xy
    assert np.abs(xy).max() == 9.5 and np.all(np.hypot(*xy.T) < 10)
    assert set(np.round(np.diff(np.unique(xy[:, 0])), 12)) == {0.5}
    centre = r.point_index(np.array(-91.0), np.array(35.0))
    assert np.array_equal(xy[centre], [0.0, 0.0])


@given(st.integers(0, 40), st.integers(0, 40))
def test_grid_points_round_trip_exactly(i_lat, i_lon):
    r = MEMPHIS
    lon, lat = r.lons[i_lon], r.lats[i_lat]
    xy = r.to_model(lon, lat)
    lon2, lat2 = r.from_model(xy)
    assert lon2 == lon and lat2 == lat  # bitwise, not approximately
    gi = r.grid_index(lon2, lat2)
    assert (int(gi[0]), int(gi[1])) == (i_lat, i_lon)


@given(st.floats(-96.0, -86.0, allow_nan=False), st.floats(30.0, 40.0, allow_nan=False))
def test_any_coordinate_round_trips_within_an_ulp(lon, lat):
    r = MEMPHIS
    lon2, lat2 = r.from_model(r.to_model(lon, lat))
    assert abs(lon2 - lon) <= 2 * np.spacing(abs(lon)) and abs(lat2 - lat) <= 2 * np.spacing(abs(lat))


def test_every_circle_point_maps_back_to_its_index():
    r = MEMPHIS
    lon, lat = r.from_model(r.circle_xy)
    assert np.array_equal(r.point_index(lon, lat), np.arange(r.n_points))


@pytest.mark.parametrize(
    "lon,lat,msg",
    [(-91.1, 35.0, "not on the"), (-97.0, 35.0, "outside the memphis region"),
     (-96.0, 30.0, "outside the 1245-point circle"), (269.0, 35.0, "outside")],
)
def test_bad_points_are_refused(lon, lat, msg):
    with pytest.raises(ValueError, match=msg):
        MEMPHIS.point_index(np.array([lon]), np.array([lat]))


def test_region_round_trips_to_dict():
    r = Region(name="other", centre_lon=10.0, centre_lat=50.0, size=21, circle_radius_index=10)
    assert Region.from_dict(r.to_dict()) == r
    assert r.n_points == int(((np.arange(21) - 10)[:, None] ** 2 + (np.arange(21) - 10)[None] ** 2 < 100).sum())


def test_in_circle_is_the_trained_disc_not_the_square():
    r = MEMPHIS
    assert r.radius_degrees == 5.0
    assert r.in_circle(r.circle_lat, r.circle_lon).all()  # every trained point
    assert r.in_circle(35.0, -91.0) and r.in_circle(35.0 + 4.99, -91.0)  # centre; just inside the edge
    assert not r.in_circle(40.0, -91.0)  # on the edge (index distance exactly 20): not a trained point
    assert not r.in_circle(40.0 - 1e-9, -91.0) and not r.in_circle(35.0, -91.0 + 5.0 - 1e-8)  # edge, rounded
    assert not r.in_circle(39.9, -95.9)  # in the square bounding box, outside the disc
    assert not r.in_circle(35.0, -91.0 + 5.0 + 1e-6)
    assert not r.in_circle(-91.0, 35.0) and not r.in_circle(np.nan, -91.0)  # swapped; NaN


def test_in_circle_accepts_exactly_the_1245_circle_grid_points():
    r = MEMPHIS
    grid = r.in_circle(r.lats[:, None], r.lons[None, :])  # every point of the 41 x 41 grid
    assert grid.shape == (41, 41) and int(grid.sum()) == 1245 == r.n_points
    assert np.array_equal(grid, r.circle_mask)
    i = np.arange(41) - 20
    on_edge = i[:, None] ** 2 + i[None, :] ** 2 == 400  # index distance exactly 20: (0, 20), (12, 16), ...
    assert int(on_edge.sum()) == 12 and not grid[on_edge].any()
    lat, lon = np.broadcast_arrays(r.lats[:, None], r.lons[None, :])
    assert not r.in_circle(lat[on_edge], lon[on_edge]).any()  # the 12 boundary points, one by one
    # every grid point inside is a circle point index p, in the circle's row-major order
    assert np.array_equal(r.point_index(lon[grid], lat[grid]), np.arange(r.n_points))
