"""Tests for engine/metadata.py: normalisation, validation, parsing and geodesic derivation."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.transform import from_bounds

from engine.errors import InvalidMetadata, InvalidRequest, RasterError
from engine.geo.raster_metadata import date_from_raster, derive_from_raster
from engine.metadata import (
    FIELDS,
    NORMALISED_ZERO,
    SatMetadata,
    derive_from_bbox,
    footprint_centre,
    grid_transform,
    ground_pixel_size,
    parse_bbox,
    parse_crs,
    parse_date,
    validate_bbox,
)

# ---- normalisation -----------------------------------------------------------------------------


def test_reference_golden_example():
    # The reference notebook's Delhi example at full precision; the reference page rounds the
    # inputs (gsd 0.929) but quotes the vector of these values (gsd 929.4).
    meta = SatMetadata(
        lon_deg=76.5712666666667,
        lat_deg=28.6965,
        gsd_m=0.929417550275767,
        cloud_cover=0.0765957446808511,
        date=dt.date(2015, 2, 27),
    )
    expected = [712.7, 659.4, 929.4, 76.6, 291.7, 166.7, 871.0]
    assert meta.normalised() == pytest.approx(expected, abs=0.05)


def test_normalisation_formula_exact():
    meta = SatMetadata(76.57, 28.70, 0.929, 0.0766, dt.date(2015, 2, 27))
    expected = [
        (76.57 + 180) / 360 * 1000,
        (28.70 + 90) / 180 * 1000,
        929.0,
        76.6,
        35 / 120 * 1000,
        2 / 12 * 1000,
        27 / 31 * 1000,
    ]
    assert meta.normalised() == pytest.approx(expected, rel=1e-12)
    assert all(isinstance(v, float) for v in meta.normalised())
    assert len(FIELDS) == 7 and FIELDS[0] == "longitude" and FIELDS[-1] == "day"


def test_unknown_fields_normalise_to_zero():
    assert SatMetadata().normalised() == list(NORMALISED_ZERO) == [0.0] * 7
    partial = SatMetadata(gsd_m=10.0).normalised()
    assert partial == [0.0, 0.0, 10000.0, 0.0, 0.0, 0.0, 0.0]
    no_date = SatMetadata(lon_deg=0.0, lat_deg=0.0, date=None).normalised()
    assert no_date[:2] == pytest.approx([500.0, 500.0]) and no_date[4:] == [0.0, 0.0, 0.0]


def test_datetime_and_numpy_values_are_coerced():
    meta = SatMetadata(lon_deg=np.float32(10.5), lat_deg=3, date=dt.datetime(2020, 5, 17, 23, 59))
    assert meta.date == dt.date(2020, 5, 17) and type(meta.date) is dt.date
    assert type(meta.lon_deg) is float and type(meta.lat_deg) is float
    assert meta.normalised()[4:] == pytest.approx([40 / 120 * 1000, 5 / 12 * 1000, 17 / 31 * 1000])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lon_deg": 180.5}, "longitude 180.5 is outside -180..180"),
        ({"lon_deg": -181}, "longitude -181"),
        ({"lat_deg": 91}, "latitude 91 is outside -90..90"),
        ({"lat_deg": -90.01}, "latitude -90.01"),
        ({"lon_deg": float("nan")}, "longitude must be a finite number"),
        ({"lat_deg": float("inf")}, "latitude must be a finite number"),
        ({"gsd_m": 0.0}, "gsd 0 m/px"),
        ({"gsd_m": -1.0}, "gsd -1 m/px"),
        ({"gsd_m": float("inf")}, "gsd must be a finite number"),
        ({"gsd_m": 2e5}, "gsd 200000 m/px"),
        ({"cloud_cover": float("nan")}, "cloud cover must be a finite number"),
        ({"cloud_cover": -0.1}, "cloud cover -0.1 is outside 0..1"),
        ({"cloud_cover": 5}, "did you mean 0.05?"),
        ({"cloud_cover": 250}, "cloud cover 250 is outside 0..1"),
        ({"date": dt.date(1979, 12, 31)}, "1979-12-31 is outside 1980-01-01..2100-12-31"),
        ({"date": dt.date(2101, 1, 1)}, "2101-01-01 is outside"),
        ({"lon_deg": "12"}, "longitude must be a number"),
        ({"gsd_m": True}, "gsd must be a number"),
        ({"date": 20210615}, "date must be"),
    ],
)
def test_validation_errors(kwargs, fragment):
    with pytest.raises(InvalidMetadata) as info:
        SatMetadata(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, InvalidRequest)  # CLI/server map the whole family


def test_validation_boundaries_are_accepted():
    SatMetadata(lon_deg=-180, lat_deg=90, gsd_m=1e5, cloud_cover=1.0, date=dt.date(1980, 1, 1))
    SatMetadata(lon_deg=180, lat_deg=-90, gsd_m=1e-3, cloud_cover=0.0, date=dt.date(2100, 12, 31))


def test_is_frozen():
    meta = SatMetadata(gsd_m=1.0)
    with pytest.raises(dataclasses_frozen_error()):
        meta.gsd_m = 2.0  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_from_normalised_round_trip():
    meta = SatMetadata(-73.98, 40.75, 0.6, 0.12, dt.date(2019, 11, 3))
    back = SatMetadata.from_normalised(meta.normalised())
    assert back.lon_deg == pytest.approx(-73.98, abs=1e-9)
    assert back.lat_deg == pytest.approx(40.75, abs=1e-9)
    assert back.gsd_m == pytest.approx(0.6) and back.cloud_cover == pytest.approx(0.12)
    assert back.date == dt.date(2019, 11, 3)
    assert SatMetadata.from_normalised(NORMALISED_ZERO) == SatMetadata()
    # 1980 is year 0 but a real date when month and day are given.
    assert SatMetadata.from_normalised(SatMetadata(date=dt.date(1980, 3, 5)).normalised()).date == (
        dt.date(1980, 3, 5)
    )
    # fp16 rounding of the vector (712.69 -> 712.5, 870.97 -> 871.0) still decodes the date.
    fp16 = [float(np.float16(v)) for v in meta.normalised()]
    assert SatMetadata.from_normalised(fp16).date == dt.date(2019, 11, 3)


def test_from_normalised_errors():
    with pytest.raises(InvalidMetadata, match="needs 7 values"):
        SatMetadata.from_normalised([1.0, 2.0])
    with pytest.raises(InvalidMetadata, match="partial date"):
        SatMetadata.from_normalised([0, 0, 0, 0, 291.7, 0.0, 871.0])
    with pytest.raises(InvalidMetadata, match="finite"):
        SatMetadata.from_normalised([float("nan")] + [0.0] * 6)


def test_with_gsd_and_rescaled_to():
    meta = SatMetadata(lon_deg=1.0, gsd_m=0.5)
    assert meta.with_gsd(2.0).gsd_m == 2.0 and meta.with_gsd(2.0).lon_deg == 1.0
    assert meta.rescaled_to(1024, 512).gsd_m == pytest.approx(1.0)  # downsampling doubles GSD
    assert meta.rescaled_to(256, 512).gsd_m == pytest.approx(0.25)
    assert SatMetadata().rescaled_to(1024, 512).gsd_m is None
    with pytest.raises(InvalidRequest, match="model_size_px"):
        meta.rescaled_to(1024, 0)
    with pytest.raises(InvalidMetadata):
        meta.with_gsd(-1.0)


def test_out_of_range_warnings():
    fine = SatMetadata(gsd_m=1.0, cloud_cover=0.1, date=dt.date(2018, 1, 1))
    assert fine.out_of_range_warnings() == []
    assert SatMetadata().out_of_range_warnings() == []
    odd = SatMetadata(gsd_m=50.0, cloud_cover=0.8, date=dt.date(1990, 1, 1))
    warnings = odd.out_of_range_warnings()
    assert len(warnings) == 3
    assert "outside 0.2-20 m/px" in warnings[0] and "50" in warnings[0] and "--size" in warnings[0]
    assert warnings[0].count("m/px") == 2  # one range, written once (TRAINING_GSD_RANGE_M)
    assert "1990" in warnings[1]
    assert "0.80" in warnings[2]
    assert len(SatMetadata(gsd_m=0.1).out_of_range_warnings()) == 1
    # advice each task's user can follow: in-painting keeps the input's grid, so no size to change
    inpaint = SatMetadata(gsd_m=50.0).out_of_range_warnings("inpaint")[0]
    assert "--size" not in inpaint and "keeps" in inpaint
    assert "--factor" in SatMetadata(gsd_m=50.0).out_of_range_warnings("superres")[0]
    assert len(SatMetadata(date=dt.date(2030, 1, 1)).out_of_range_warnings()) == 1


def test_as_dict_and_tags_round_trip():
    meta = SatMetadata(12.5, 41.9, 0.3, None, dt.date(2021, 6, 15))
    as_dict = meta.as_dict()
    assert as_dict == {
        "lon_deg": 12.5, "lat_deg": 41.9, "gsd_m": 0.3, "cloud_cover": None, "date": "2021-06-15"
    }
    assert SatMetadata(**as_dict) == meta
    tags = meta.to_tags()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    assert tags["metadata_lon_deg"] == "12.5" and tags["metadata_cloud_cover"] == "unknown"
    assert tags["metadata_date"] == "2021-06-15"
    assert [float(v) for v in tags["metadata_normalised"].split(",")] == meta.normalised()
    assert SatMetadata.from_tags(tags) == meta
    only_vector = {"metadata_normalised": tags["metadata_normalised"]}
    assert SatMetadata.from_tags(only_vector).date == dt.date(2021, 6, 15)


# ---- parsing -----------------------------------------------------------------------------------


def test_parse_bbox():
    assert parse_bbox("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
    assert parse_bbox(" -1.5, 2e3 ,3 , 4 ") == (-1.5, 2000.0, 3.0, 4.0)
    assert parse_bbox([1, 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(InvalidRequest, match="has 3 values; give 4"):
        parse_bbox("1,2,3")
    with pytest.raises(InvalidRequest, match="has 5 values"):
        parse_bbox("1,2,3,4,5")
    with pytest.raises(InvalidRequest, match="'abc' is not a number"):
        parse_bbox("1,abc,3,4")
    with pytest.raises(InvalidRequest, match="not finite"):
        parse_bbox("1,nan,3,4")


def test_parse_date():
    assert parse_date("2021-06-15") == dt.date(2021, 6, 15)
    assert parse_date("20210615") == dt.date(2021, 6, 15)
    assert parse_date(" 2021-06-15T10:10:31Z ") == dt.date(2021, 6, 15)
    assert parse_date(dt.datetime(2021, 6, 15, 3)) == dt.date(2021, 6, 15)
    for bad in ("15/06/2021", "2021-6-15", "June 2021", "", "2021061"):
        with pytest.raises(InvalidRequest, match="expected format YYYY-MM-DD"):
            parse_date(bad)
    with pytest.raises(InvalidRequest, match="not a calendar date"):
        parse_date("2021-02-30")


def test_parse_crs():
    assert parse_crs("EPSG:32633").to_epsg() == 32633
    assert parse_crs("4326").to_epsg() == 4326
    assert parse_crs(3857).to_epsg() == 3857
    assert parse_crs(pyproj.CRS.from_epsg(32633).to_wkt()).to_epsg() == 32633
    assert parse_crs("+proj=utm +zone=33 +datum=WGS84 +units=m +no_defs").is_projected
    with pytest.raises(InvalidRequest) as info:
        parse_crs("EPSG:99999")
    assert str(info.value) == (
        "unknown CRS 'EPSG:99999'; give an EPSG code such as EPSG:32633, a WKT or a PROJ string"
    )
    with pytest.raises(InvalidRequest, match="unknown CRS 'not a crs'"):
        parse_crs("not a crs")
    with pytest.raises(InvalidRequest, match="CRS is empty"):
        parse_crs("  ")


# ---- geometry ----------------------------------------------------------------------------------

ROME_LON, ROME_LAT = 12.5, 41.9


def _same_extent_three_ways(half_w_deg=0.03, half_h_deg=0.0225):
    """One ground extent around Rome as a 4326 bbox, the exact 3857 bbox, and a UTM 33N square
    of the same geodesic width/height centred on the same point."""
    geo = (
        ROME_LON - half_w_deg, ROME_LAT - half_h_deg, ROME_LON + half_w_deg, ROME_LAT + half_h_deg
    )
    to_merc = pyproj.Transformer.from_crs(4326, 3857, always_xy=True)
    x0, y0 = to_merc.transform(geo[0], geo[1])
    x1, y1 = to_merc.transform(geo[2], geo[3])
    geod = pyproj.Geod(ellps="WGS84")
    width_m = geod.line_length([geo[0], geo[2]], [ROME_LAT, ROME_LAT])
    height_m = geod.line_length([ROME_LON, ROME_LON], [geo[1], geo[3]])
    # A UTM box is a rectangle in grid metres: centre it on the same point and give it the same
    # ground size (the grid scale factor here is ~0.9997, well inside the 1% tolerance).
    to_utm = pyproj.Transformer.from_crs(4326, 32633, always_xy=True)
    ex, ny = to_utm.transform(ROME_LON, ROME_LAT)
    utm = (ex - width_m / 2, ny - height_m / 2, ex + width_m / 2, ny + height_m / 2)
    return geo, (x0, y0, x1, y1), utm, (width_m, height_m)


def test_same_ground_extent_same_centre_and_gsd_in_any_crs():
    geo, merc, utm, (width_m, height_m) = _same_extent_three_ways()
    results = {
        "EPSG:4326": derive_from_bbox(geo, "EPSG:4326", 512, 384),
        "EPSG:3857": derive_from_bbox(merc, "EPSG:3857", 512, 384),
        "EPSG:32633": derive_from_bbox(utm, "EPSG:32633", 512, 384),
    }
    expected_gsd = math.sqrt(width_m / 512 * height_m / 384)
    for name, meta in results.items():
        assert meta.lon_deg == pytest.approx(ROME_LON, abs=1e-4), name
        assert meta.lat_deg == pytest.approx(ROME_LAT, abs=1e-4), name
        assert meta.gsd_m == pytest.approx(expected_gsd, rel=0.01), name
    # The extent is ~5 km x 5 km, so the GSD is ~10 m: a sanity anchor for expected_gsd itself.
    assert 9.0 < expected_gsd < 14.0
    # Naive Web Mercator metres are inflated by 1/cos(lat); the geodesic GSD must not be.
    naive = (merc[2] - merc[0]) / 512
    geodesic_x, _ = ground_pixel_size(merc, "EPSG:3857", 512, 384)
    assert naive / geodesic_x == pytest.approx(1 / math.cos(math.radians(ROME_LAT)), rel=0.01)
    assert abs(naive / geodesic_x - 1) > 0.3


def test_high_latitude_mercator_matches_geographic():
    # At 70N Web Mercator inflates metres ~2.9x; geodesic GSD must agree with the 4326 box.
    geo = (25.0, 69.95, 25.2, 70.05)
    to_merc = pyproj.Transformer.from_crs(4326, 3857, always_xy=True)
    merc = (*to_merc.transform(geo[0], geo[1]), *to_merc.transform(geo[2], geo[3]))
    a = derive_from_bbox(geo, 4326, 256, 256)
    b = derive_from_bbox(merc, 3857, 256, 256)
    assert b.gsd_m == pytest.approx(a.gsd_m, rel=1e-3)
    assert (b.lon_deg, b.lat_deg) == pytest.approx((a.lon_deg, a.lat_deg), abs=1e-6)


def test_known_answer_utm_square():
    # 5120 m of UTM grid on the central meridian of zone 33N is 5120/0.9996 m on the ground.
    bbox = (500000 - 2560, 4640000 - 2560, 500000 + 2560, 4640000 + 2560)
    meta = derive_from_bbox(bbox, "EPSG:32633", 512, 512, date="2021-06-15", cloud_cover=0.1)
    assert meta.gsd_m == pytest.approx(10.0 / 0.9996, rel=2e-4)
    assert meta.lon_deg == pytest.approx(15.0, abs=1e-9)
    assert meta.lat_deg == pytest.approx(41.912, abs=1e-3)
    assert meta.date == dt.date(2021, 6, 15) and meta.cloud_cover == 0.1
    gsd_x, gsd_y = ground_pixel_size(bbox, "EPSG:32633", 512, 256)
    assert gsd_y == pytest.approx(2 * gsd_x, rel=1e-3)


def test_centroid_is_area_weighted_not_bbox_midpoint():
    # A geographic box from 0 to 80N: the area centroid lies well south of the 40N midpoint
    # because high-latitude cells are small.
    lon, lat = footprint_centre((10.0, 0.0, 20.0, 80.0), "EPSG:4326")
    assert lon == pytest.approx(15.0, abs=1e-6)
    assert 25.0 < lat < 38.0


def test_southern_hemisphere_utm():
    to_utm = pyproj.Transformer.from_crs(4326, 32756, always_xy=True)  # Sydney, zone 56S
    ex, ny = to_utm.transform(151.2, -33.87)
    meta = derive_from_bbox((ex - 1000, ny - 1000, ex + 1000, ny + 1000), "EPSG:32756", 1000, 1000)
    assert (meta.lon_deg, meta.lat_deg) == pytest.approx((151.2, -33.87), abs=1e-4)
    assert meta.gsd_m == pytest.approx(2.0, rel=0.01)


def test_utm_box_crossing_the_antimeridian():
    # Fiji in UTM 60S: the box reaches -179.9 while the zone's area of use is 174..180.
    to_utm = pyproj.Transformer.from_crs(4326, 32760, always_xy=True)
    ex, ny = to_utm.transform(179.99, -17.0)
    meta = derive_from_bbox((ex - 5000, ny - 5000, ex + 5000, ny + 5000), "EPSG:32760", 100, 100)
    assert (meta.lon_deg, meta.lat_deg) == pytest.approx((179.99, -17.0), abs=1e-4)
    assert meta.gsd_m == pytest.approx(100.0, rel=0.01)


def test_polar_stereographic_box_around_the_pole():
    meta = derive_from_bbox((-50_000, -50_000, 50_000, 50_000), "EPSG:3413", 100, 100)
    assert meta.lat_deg == pytest.approx(90.0, abs=1e-6)
    assert -180.0 <= meta.lon_deg <= 180.0
    # NSIDC polar stereographic has true scale at 70N, so grid metres are ~3% short at the pole.
    assert meta.gsd_m == pytest.approx(1000.0, rel=0.05)


@pytest.mark.parametrize(
    ("bbox", "crs", "fragment"),
    [
        ((13.0, 41.0, 12.0, 42.0), "EPSG:4326", "bbox is inverted: maxx (12) < minx (13)"),
        ((12.0, 42.0, 13.0, 41.0), "EPSG:4326", "bbox is inverted: maxy"),
        ((12.0, 41.0, 12.0, 42.0), "EPSG:4326", "bbox is empty: minx == maxx"),
        ((12.0, 41.0, 13.0, 41.0), "EPSG:32633", "bbox is empty: miny == maxy"),
        ((12.0, 41.0, 190.0, 42.0), "EPSG:4326", "outside -180..180 x -90..90"),
        ((12.0, -91.0, 13.0, 42.0), "EPSG:4326", "outside -180..180 x -90..90"),
        # Degrees given with a UTM CRS: lands ~4.4 degrees west of zone 33N.
        ((12.4, 41.8, 12.6, 42.0), "EPSG:32633", "the values look like degrees"),
        # An easting 450 km west of the central meridian: ~9.6E, well outside 12-18E.
        ((50000, 4640000, 55000, 4645000), "EPSG:32633", "outside the area of use of EPSG:32633"),
        ((0, 0, 1000, 1000), "EPSG:32633", "outside the area of use"),
        ((0, 1e7, 1e5, 2e8), "EPSG:3857", "outside the area of use of EPSG:3857"),
        ((0, 0, 10, 10), "EPSG:4978", "neither geographic nor projected"),
    ],
)
def test_bbox_errors(bbox, crs, fragment):
    with pytest.raises(InvalidRequest) as info:
        validate_bbox(bbox, crs)
    assert fragment in str(info.value)
    with pytest.raises(InvalidRequest):
        derive_from_bbox(bbox, crs, 64, 64)


def test_utm_bbox_spilling_a_little_over_the_zone_edge_is_accepted():
    # A Sentinel-2-sized (110 km) tile at 60N on the eastern edge of zone 33N reaches ~18.5E.
    to_utm = pyproj.Transformer.from_crs(4326, 32633, always_xy=True)
    ex, ny = to_utm.transform(17.6, 60.0)
    box = (ex - 55_000, ny - 55_000, ex + 55_000, ny + 55_000)
    assert validate_bbox(box, "EPSG:32633") == box


def test_unknown_crs_in_derivation():
    with pytest.raises(InvalidRequest, match="unknown CRS 'EPSG:99999'"):
        derive_from_bbox((0, 0, 1, 1), "EPSG:99999", 64, 64)


def test_bad_sizes():
    with pytest.raises(InvalidRequest, match="width must be a positive whole number"):
        derive_from_bbox((12.4, 41.8, 12.6, 42.0), 4326, 0, 64)
    with pytest.raises(InvalidRequest, match="height must be a positive whole number"):
        ground_pixel_size((12.4, 41.8, 12.6, 42.0), 4326, 64, 2.5)


def test_grid_transform_maps_pixel_edges_onto_bbox():
    bbox = (300000.0, 4600000.0, 305120.0, 4602560.0)
    transform = grid_transform(bbox, 512, 256)
    assert transform * (0, 0) == pytest.approx((300000.0, 4602560.0))
    assert transform * (512, 256) == pytest.approx((305120.0, 4600000.0))
    assert (transform.a, transform.e) == pytest.approx((10.0, -10.0))
    with pytest.raises(InvalidRequest):
        grid_transform((1, 1, 0, 2), 10, 10)


# ---- rasters -----------------------------------------------------------------------------------

UTM_BOX = (500000.0 - 2560, 4640000.0 - 2560, 500000.0 + 2560, 4640000.0 + 2560)


def _write_tif(path, bbox=UTM_BOX, width=64, height=64, crs="EPSG:32633", tags=None):
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
        "transform": from_bounds(*bbox, width, height),
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((1, height, width), dtype=np.uint8))
        if tags:
            dst.update_tags(**tags)
    return path


def test_derive_from_raster_geometry_and_rescale(tmp_path):
    path = _write_tif(tmp_path / "scene.tif", width=64, height=128)
    meta = derive_from_raster(path)
    assert meta.lon_deg == pytest.approx(15.0, abs=1e-9)
    # 5120 m over 64 px wide and 128 px tall -> geometric mean of 80 and 40 m (ground, /0.9996)
    assert meta.gsd_m == pytest.approx(math.sqrt(80 * 40) / 0.9996, rel=1e-3)
    assert meta.date is None
    resized = derive_from_raster(path, model_size_px=256)
    assert resized.gsd_m == pytest.approx(meta.gsd_m * 64 / 256)


def test_date_from_tags(tmp_path):
    stamp = "2021-06-15T10:10:31Z"
    path = _write_tif(tmp_path / "a_20190101.tif", tags={"ACQUISITION_DATE": stamp})
    assert date_from_raster(path) == (dt.date(2021, 6, 15), f"tag ACQUISITION_DATE={stamp!r}")
    assert derive_from_raster(path).date == dt.date(2021, 6, 15)  # tags beat the file name
    path = _write_tif(tmp_path / "b.tif", tags={"date_acquired": "2018-03-04"})
    assert date_from_raster(path)[0] == dt.date(2018, 3, 4)
    path = _write_tif(tmp_path / "c.tif", tags={"TIFFTAG_DATETIME": "2017:08:09 12:00:00"})
    date, source = date_from_raster(path)
    assert date == dt.date(2017, 8, 9) and "file creation time" in source
    # Our own outputs round-trip their date.
    tags = SatMetadata(date=dt.date(2022, 2, 2)).to_tags()
    path = _write_tif(tmp_path / "d.tif", tags=tags)
    assert derive_from_raster(path).date == dt.date(2022, 2, 2)


def test_file_name_beats_tifftag_datetime(tmp_path):
    # TIFFTAG_DATETIME is when the file was written; a Sentinel-2 name says when it was sensed.
    name = "S2B_MSIL2A_20210615T101031_N0300_R022_T33TTG_20210616T130452.tif"
    path = _write_tif(tmp_path / name, tags={"TIFFTAG_DATETIME": "2024:01:01 00:00:00"})
    assert date_from_raster(path) == (dt.date(2021, 6, 15), f"file name {name!r}")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("LC08_L2SP_190031_20210615_20210622_02_T1_SR_B4.TIF", dt.date(2021, 6, 15)),
        ("T33TTG_20200301T100021_B04_10m.tif", dt.date(2020, 3, 1)),
        ("rome_2019-07-04.tif", dt.date(2019, 7, 4)),
        ("tile_99999999_20150227.tif", dt.date(2015, 2, 27)),  # first *plausible* date
        ("scene_123456789012.tif", None),
        ("rome.tif", None),
    ],
)
def test_date_from_file_name(tmp_path, name, expected):
    path = _write_tif(tmp_path / name)
    date, source = date_from_raster(path)
    assert date == expected
    assert source.startswith("file name") == (expected is not None)


def test_explicit_date_wins(tmp_path):
    path = _write_tif(tmp_path / "x_20210615.tif", tags={"ACQUISITION_DATE": "2021-06-15"})
    assert derive_from_raster(path, date="2010-01-02").date == dt.date(2010, 1, 2)
    assert derive_from_raster(path, date=dt.date(2011, 1, 2), cloud_cover=0.3).cloud_cover == 0.3


def test_raster_without_crs(tmp_path):
    path = _write_tif(tmp_path / "nocrs.tif", crs=None)
    with pytest.raises(RasterError, match="has no CRS.*gdal_edit"):
        derive_from_raster(path)


def test_unreadable_and_missing_raster(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(RasterError, match="cannot read raster .*broken.tif"):
        derive_from_raster(bad)
    with pytest.raises(RasterError, match="does not exist"):
        date_from_raster(tmp_path / "missing.tif")


def test_raster_outside_its_crs_area_is_a_raster_error(tmp_path):
    path = _write_tif(tmp_path / "wrongzone.tif", bbox=(12.4, 41.8, 12.6, 42.0))
    with pytest.raises(RasterError, match="wrongzone.tif.*area of use"):
        derive_from_raster(path)


def test_an_undated_diffusionsat_output_stays_undated_whatever_its_name(tmp_path):
    # Older plugin versions named outputs after the run time: that is no acquisition date.
    tags = {"synthetic": "True", "software": "diffusionsat 0.1", "TIFFTAG_DATETIME": "2026:12:01 07:45:40"}
    path = _write_tif(tmp_path / "inpaint_20261201-074540.tif", tags=tags)
    assert date_from_raster(path)[0] is None
    assert derive_from_raster(path).date is None
    # A dated output keeps its date (from its tags).
    path = _write_tif(tmp_path / "generate_20261201-074540.tif", tags={**tags, "metadata_date": "2021-06-15"})
    assert date_from_raster(path)[0] == dt.date(2021, 6, 15)
