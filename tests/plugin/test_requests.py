"""Request builders: QGIS state → request dicts, for canvas CRSs in UTM, Web Mercator and WGS 84."""

from __future__ import annotations

import datetime as dt

import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRectangle,
)

from qgis_plugin.requests import (
    RequestError,
    crs_ref,
    generate_request,
    grid_info,
    guess_band_name,
    inpaint_request,
    output_size,
    parse_band_names,
    parse_date,
    superres_request,
    temporal_request,
)

# Rome: about 5.0 x 5.6 km around the Colosseum, given in UTM 33N and transformed to the others.
UTM = QgsCoordinateReferenceSystem("EPSG:32633")
MERC = QgsCoordinateReferenceSystem("EPSG:3857")
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
UTM_EXTENT = QgsRectangle(289000, 4639000, 294000, 4644600)


def in_crs(crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    if crs == UTM:
        return QgsRectangle(UTM_EXTENT)
    ct = QgsCoordinateTransform(UTM, crs, QgsProject.instance().transformContext())
    return ct.transformBoundingBox(UTM_EXTENT)


@pytest.mark.parametrize("crs, authid", [(UTM, "EPSG:32633"), (MERC, "EPSG:3857"), (WGS84, "EPSG:4326")])
def test_generate_request_carries_the_grid_in_the_canvas_crs(crs, authid):
    extent = in_crs(crs)
    width, height = output_size(extent, crs, 512)
    req = generate_request(extent, crs, width=width, height=height, date=dt.date(2021, 6, 15),
                           cloud_cover=0.05, prompt=" a stadium ", steps=2, seed=7, model="tiny")
    assert req["task"] == "generate"
    assert req["crs"] == authid
    assert req["bbox"] == pytest.approx([extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()])
    assert req["date"] == "2021-06-15"
    assert req["cloud_cover"] == 0.05
    assert req["prompt"] == "a stadium"
    assert (req["width"], req["height"], req["steps"], req["seed"], req["model"]) == (width, height, 2, 7, "tiny")
    # The plugin sends the grid, never model metadata: the engine derives lon/lat/GSD.
    assert not {"lon", "lat", "gsd", "gsd_m", "metadata"} & set(req)


@pytest.mark.parametrize("crs", [UTM, MERC, WGS84])
def test_size_keeps_pixels_square_on_the_ground_in_every_crs(crs):
    extent = in_crs(crs)
    width, height = output_size(extent, crs, 512)
    assert height == 512 and width % 8 == 0
    # 5.0 km x 5.6 km on the ground -> 5.0/5.6*512 = 457 -> 456 px, in every CRS (Mercator's
    # and WGS 84's bounding boxes of the UTM rectangle are slightly larger).
    assert width == pytest.approx(456, abs=16)
    info = grid_info(extent, crs, width, height)
    assert info.gsd_m == pytest.approx(5600 / 512, rel=0.04)
    assert info.centre_lon == pytest.approx(12.49, abs=0.02)
    assert info.centre_lat == pytest.approx(41.90, abs=0.02)
    assert "m/px" in info.summary()


def test_web_mercator_gsd_is_measured_on_the_ground_not_in_projected_metres():
    extent = in_crs(MERC)
    info = grid_info(extent, MERC, 512, 512)
    # Mercator metres at 42° N are 1/cos(42°) = 1.35x ground metres.
    assert extent.height() / 512 > 1.3 * info.height_m / 512


def test_custom_crs_is_sent_as_wkt():
    crs = QgsCoordinateReferenceSystem.fromProj("+proj=laea +lat_0=41.9 +lon_0=12.49 +x_0=0 +y_0=0 +ellps=WGS84 +units=m")
    ref = crs_ref(crs)
    assert not ref.startswith("EPSG:") and ("PROJCRS" in ref or "PROJCS" in ref)


def test_builders_refuse_what_the_engine_would():
    with pytest.raises(RequestError, match="draw a rectangle"):
        generate_request(QgsRectangle(), UTM, width=64, height=64)
    with pytest.raises(RequestError, match="multiples of 8"):
        generate_request(UTM_EXTENT, UTM, width=60, height=64)
    with pytest.raises(RequestError, match="fraction 0..1"):
        generate_request(UTM_EXTENT, UTM, width=64, height=64, cloud_cover=5)
    with pytest.raises(RequestError, match="not valid"):
        crs_ref(QgsCoordinateReferenceSystem())


def test_unset_values_are_left_to_the_engine():
    req = generate_request(UTM_EXTENT, UTM, width=64, height=64)
    assert req["date"] is None and req["cloud_cover"] is None
    assert "prompt" not in req and "seed" not in req and "steps" not in req


def test_superres_inpaint_temporal_requests():
    sr = superres_request("/data/s2.tif", bands=["B02", "B03", "B04", "B08"], extent=UTM_EXTENT, crs=UTM, factor=4,
                          model="tiny", options={"steps": 2})
    assert sr == {"task": "superres", "input": "/data/s2.tif", "bands": "B02,B03,B04,B08", "model": "tiny",
                  "bbox": [289000, 4639000, 294000, 4644600], "crs": "EPSG:32633", "factor": 4, "steps": 2}
    ip = inpaint_request("/data/rgb.tif", "/data/qa.tif", mask_rule="bits:14-15=3")
    assert ip == {"task": "inpaint", "input": "/data/rgb.tif", "mask": "/data/qa.tif", "mask_rule": "bits:14-15=3"}
    assert inpaint_request("/data/rgb.tif", "nodata")["mask"] == "nodata"
    tp = temporal_request(["/a.tif", "/b.tif"], [dt.date(2020, 5, 1), dt.date(2020, 7, 1)], dt.date(2020, 6, 1))
    assert tp == {"task": "temporal", "inputs": ["/a.tif", "/b.tif"], "date": "2020-06-01",
                  "input_dates": ["2020-05-01", "2020-07-01"]}
    # No dates at all: the engine reads them from the files.
    assert "input_dates" not in temporal_request(["/a.tif"], [None], dt.date(2020, 6, 1))
    with pytest.raises(RequestError, match="no date"):
        temporal_request(["/a.tif", "/b.tif"], [dt.date(2020, 5, 1), None], dt.date(2020, 6, 1))
    with pytest.raises(RequestError, match="every band needs a name"):
        superres_request("/x.tif", bands=["B02", ""])


def test_dates_and_band_names_from_text():
    assert parse_date("2021-06-15") == dt.date(2021, 6, 15)
    assert parse_date("2021:06:15 00:00:00") == dt.date(2021, 6, 15)
    assert parse_date("S2A_MSIL2A_20210615T101031_N0300_R022_T33TTG") == dt.date(2021, 6, 15)
    assert parse_date("no date here") is None
    assert guess_band_name("T33TTG_20210615T101031_B8A_20m") == "B8A"
    assert guess_band_name("T33TTG_20210615T101031_B04_10m") == "B04"
    assert guess_band_name("band 4") is None
    assert parse_band_names("B02, B03 B04") == ["B02", "B03", "B04"]
    assert parse_band_names("  ") is None


def test_generate_request_leaves_the_sampler_to_the_engine_unless_one_is_chosen():
    """The plugin used to send "scheduler": "default" (the checkpoint's own sampler) on every
    request, which overrode the engine's default sampler; now it sends one only when chosen."""
    assert "scheduler" not in generate_request(UTM_EXTENT, UTM, size=64)
    assert "scheduler" not in generate_request(UTM_EXTENT, UTM, size=64, scheduler="  ")
    assert generate_request(UTM_EXTENT, UTM, size=64, scheduler="ddim")["scheduler"] == "ddim"
