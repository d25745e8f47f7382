"""Sentinel-2 band table, readers and the reference radiometry (engine/geo/sentinel2.py, engine/geo/sentinel2_bands.py).

All rasters are small synthetic files written into tmp_path in UTM zone 33N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from engine.errors import InvalidRequest
from engine.geo import sentinel2 as s2
from engine.geo import sentinel2_bands as s2b
from engine.geo.grid import Grid

UTM = "EPSG:32633"
X0, Y0 = 399960.0, 5000040.0  # a Sentinel-2 tile origin (pixel corner)


def write_raster(path: Path, data, res: float, *, nodata=None, descriptions=None, tags=None,
                 driver="GTiff", band_tags=None, x0=X0, y0=Y0):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = dict(driver=driver, width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=UTM, transform=Affine(res, 0, x0, 0, -res, y0))
    if nodata is not None:
        profile["nodata"] = nodata
    if driver == "JP2OpenJPEG":
        profile.update(quality=100, reversible=True)  # lossless, so DNs survive the round trip
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)
        if band_tags:
            dst.update_tags(1, **band_tags)
    return path


def jp2_available() -> bool:
    with rasterio.Env() as env:
        return "JP2OpenJPEG" in env.drivers()


def mean_dn(band: str) -> float:
    return s2b.BANDS[band].mean


def make_stack(values: dict[str, np.ndarray], **kw) -> s2.S2Stack:
    names = tuple(values)
    arr = np.stack([np.asarray(v, np.float32) for v in values.values()])
    grid = Grid(rasterio.crs.CRS.from_string(UTM), Affine(10, 0, X0, 0, -10, Y0), arr.shape[2], arr.shape[1])
    return s2.S2Stack(array=arr, bands=names, grid=grid,
                      valid=np.isfinite(arr).all(0), **kw)


# ----------------------------------------------------------------------------- band table


def test_band_table_has_the_thirteen_bands_with_reference_statistics():
    assert s2b.L1C_ORDER == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                            "B09", "B10", "B11", "B12")
    assert s2b.L2A_ORDER == tuple(b for b in s2b.L1C_ORDER if b != "B10")
    assert [s2b.BANDS[b].gsd_m for b in s2b.L1C_ORDER] == [60, 10, 10, 10, 20, 20, 20, 10, 20,
                                                          60, 60, 20, 20]
    waves = [s2b.BANDS[b].wavelength_nm for b in s2b.L1C_ORDER]
    assert waves == sorted(waves)
    assert s2b.BANDS["B04"].mean == 1136.26026392 and s2b.BANDS["B04"].std == 965.23119807
    assert s2b.BANDS["B10"].mean == 14.77112979 and s2b.BANDS["B12"].std == 1087.6020813
    assert s2b.MODEL_BANDS == ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11",
                              "B12")


@pytest.mark.parametrize("alias,canon", [
    ("B1", "B01"), ("B01", "B01"), ("b01", "B01"), ("1", "B01"), ("B8A", "B8A"),
    ("B8a", "B8A"), ("b8a", "B8A"), ("B08A", "B8A"), ("b12", "B12"), (" B4 ", "B04"),
])
def test_band_aliases(alias, canon):
    assert s2b.canonical_band_name(alias) == canon
    assert s2b.band_info(alias).name == canon


@pytest.mark.parametrize("bad", ["B13", "B0", "B4A", "8B", "red", ""])
def test_unknown_band_is_refused_with_the_valid_names(bad):
    with pytest.raises(InvalidRequest, match="B8A"):
        s2b.canonical_band_name(bad)


def test_band_from_filename():
    assert s2.band_from_filename("T33TTG_20210615T101031_B04.jp2") == "B04"
    assert s2.band_from_filename("T33TTG_20210615T101031_B8A_20m.jp2") == "B8A"
    assert s2.band_from_filename("B04.tif") == "B04"
    assert s2.band_from_filename("T33TTG_20210615T101031_TCI_10m.jp2") is None
    assert s2.band_from_filename("T33TTG_20210615T101031_SCL_20m.jp2") is None


def test_parse_baseline_and_level():
    for text in ("04.00", "4.0", "N0400", "0400", 4):
        assert s2b.parse_baseline(text) == "04.00"
    assert s2b.parse_baseline("N0301") == "03.01"
    assert s2b.parse_baseline(None) is None
    with pytest.raises(InvalidRequest):
        s2b.parse_baseline("new")
    assert s2b.parse_level("Level-2A") == "L2A" and s2b.parse_level("S2MSI1C") == "L1C"
    with pytest.raises(InvalidRequest):
        s2b.parse_level("L3")


# ----------------------------------------------------------------------------- multiband


def test_read_multiband_with_explicit_bands(tmp_path):
    data = np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8) + 1
    path = write_raster(tmp_path / "four.tif", data, 10)
    stack = s2.read_multiband(path, "B02, b3 ,B4,B8")
    assert stack.bands == ("B02", "B03", "B04", "B08")
    assert stack.array.dtype == np.float32 and stack.array.shape == (4, 6, 8)
    np.testing.assert_array_equal(stack.band("B03"), data[1])
    assert stack.valid.all()
    assert stack.crs.to_string() == UTM and stack.transform == Affine(10, 0, X0, 0, -10, Y0)
    # "-" skips a file band (e.g. an alpha band)
    stack = s2.read_multiband(path, ["B02", "-", "B04", "B08"])
    assert stack.bands == ("B02", "B04", "B08")
    np.testing.assert_array_equal(stack.array[1], data[2])
    with pytest.raises(InvalidRequest, match="4 bands but --bands names 3"):
        s2.read_multiband(path, "B02,B03,B04")
    with pytest.raises(InvalidRequest, match="more than once"):
        s2.read_multiband(path, "B02,B02,B04,B08")


def test_read_multiband_uses_band_descriptions(tmp_path):
    data = np.full((3, 4, 4), 500, np.uint16)
    path = write_raster(tmp_path / "desc.tif", data, 10, descriptions=["B8A", "b11", "B12"])
    assert s2.read_multiband(path).bands == ("B8A", "B11", "B12")
    # GDAL's SENTINEL2 driver style
    path = write_raster(tmp_path / "gdal.tif", data, 10, descriptions=[
        "B4, central wavelength 665 nm", "B3, central wavelength 560 nm",
        "B2, central wavelength 490 nm"])
    assert s2.read_multiband(path).bands == ("B04", "B03", "B02")


def test_read_multiband_standard_orders_and_unknown_count(tmp_path):
    p13 = write_raster(tmp_path / "l1c.tif", np.ones((13, 3, 3), np.uint16), 10)
    p12 = write_raster(tmp_path / "l2a.tif", np.ones((12, 3, 3), np.uint16), 10)
    p5 = write_raster(tmp_path / "five.tif", np.ones((5, 3, 3), np.uint16), 10,
                      descriptions=["red", "green", "blue", "nir", "swir"])
    assert s2.read_multiband(p13).bands == s2b.L1C_ORDER
    assert s2.read_multiband(p12).bands == s2b.L2A_ORDER
    with pytest.raises(InvalidRequest, match=r"5 bands.*--bands"):
        s2.read_multiband(p5)


def test_read_multiband_reads_only_the_window(tmp_path):
    data = (np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30) + 1)
    path = write_raster(tmp_path / "w.tif", data, 10)
    stack = s2.read_multiband(path, "B02,B03", window=Window(5, 3, 10, 7))
    assert stack.shape == (7, 10)
    np.testing.assert_array_equal(stack.array, data[:, 3:10, 5:15])
    assert stack.transform == Affine(10, 0, X0 + 50, 0, -10, Y0 - 30)
    same = s2.read_multiband(path, "B02,B03", window=((3, 10), (5, 15)))
    np.testing.assert_array_equal(same.array, stack.array)
    by_bounds = s2.read_multiband(path, "B02,B03",
                                  bounds=(X0 + 50, Y0 - 100, X0 + 150, Y0 - 30))
    np.testing.assert_array_equal(by_bounds.array, stack.array)
    with pytest.raises(InvalidRequest, match="outside"):
        s2.read_multiband(path, "B02,B03", window=Window(25, 0, 10, 5))


def test_product_info_from_geotiff_tags(tmp_path):
    path = write_raster(tmp_path / "t.tif", np.ones((12, 2, 2), np.uint16), 10,
                        tags={"PROCESSING_BASELINE": "04.00", "PRODUCT_TYPE": "S2MSI2A"})
    stack = s2.read_multiband(path)
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L2A", "04.00", True)
    # what the user states wins
    stack = s2.read_multiband(path, level="L1C", baseline="N0301")
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L1C", "03.01", False)
    # a product name in any tag is understood too
    path = write_raster(tmp_path / "n.tif", np.ones((13, 2, 2), np.uint16), 10, tags={
        "PRODUCT_URI": "S2A_MSIL1C_20230105T101031_N0509_R022_T33TTG_20230105T121545.SAFE"})
    stack = s2.read_multiband(path)
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L1C", "05.09", True)
    # an ADD_OFFSET declared in the tags decides when the baseline is not known
    path = write_raster(tmp_path / "o.tif", np.ones((13, 2, 2), np.uint16), 10,
                        tags={"RADIO_ADD_OFFSET": "-1000"})
    assert s2.read_multiband(path).offset_applied is True


def test_nodata_zero_nan_and_dataset_nodata_never_spread(tmp_path):
    h, w = 6, 7
    data = np.zeros((13, h, w), np.float32)
    for i, b in enumerate(s2b.L1C_ORDER):
        data[i] = s2b.BANDS[b].mean + 100.0
    data[s2b.L1C_ORDER.index("B03"), 1, 1] = 0          # Sentinel-2's own no-data DN
    data[s2b.L1C_ORDER.index("B11"), 2, 3] = np.nan     # NaN
    data[s2b.L1C_ORDER.index("B8A"), 4, 5] = -9999      # the dataset's nodata value
    data[s2b.L1C_ORDER.index("B01"), 5, 0] = 0          # a band the model does not use
    path = write_raster(tmp_path / "nd.tif", data, 10, nodata=-9999,
                        tags={"PROCESSING_BASELINE": "03.01", "PRODUCT_TYPE": "S2MSI1C"})
    stack = s2.read_multiband(path)
    assert not stack.valid[1, 1] and not stack.valid[2, 3] and not stack.valid[4, 5]
    assert not stack.valid[5, 0]
    assert int((~stack.valid).sum()) == 4

    x, valid, warnings = s2b.to_model_input(stack)
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    expected_invalid = np.zeros((h, w), bool)
    expected_invalid[1, 1] = expected_invalid[2, 3] = expected_invalid[4, 5] = True
    np.testing.assert_array_equal(~valid, expected_invalid)  # B01 is not a model band
    # the filled pixels sit at the band mean (127/255); every other pixel is untouched
    c = s2b.MODEL_BANDS.index
    assert x[c("B03"), 1, 1] == np.float32(127 / 255)
    assert x[c("B11"), 2, 3] == np.float32(127 / 255)
    assert x[c("B8A"), 4, 5] == np.float32(127 / 255)
    for k, band in enumerate(s2b.MODEL_BANDS):
        good = np.ones((h, w), bool)
        good[[1, 2, 4], [1, 3, 5]] = False
        ref = s2b.normalise_bands(np.array([[[s2b.BANDS[band].mean + 100.0]]]), [band])[0, 0, 0]
        assert (x[k][good] == ref).all()
    assert any("3 of 42 pixels are nodata" in w for w in warnings)


# ----------------------------------------------------------------------------- per-band files


def scene(res: float, size_m: int = 600, square=(120, 360, 180, 420), bright=3000, dark=1000):
    """A dark scene of size_m metres with a bright square [x0, x1) x [y0, y1) in metres from the
    top-left corner (x right, y down), sampled at res metres."""
    n = int(size_m / res)
    img = np.full((n, n), dark, np.uint16)
    x0, x1, y0, y1 = (int(v / res) for v in square)
    img[y0:y1, x0:x1] = bright
    return img


def test_band_files_at_10_20_60_m_are_aligned_on_the_10_m_grid(tmp_path):
    write_raster(tmp_path / "T33TTG_20210615T101031_B02.tif", scene(10), 10)
    write_raster(tmp_path / "T33TTG_20210615T101031_B8A_20m.tif", scene(20), 20)
    write_raster(tmp_path / "B09.tif", scene(60), 60)
    write_raster(tmp_path / "preview_TCI.tif", scene(10), 10)  # not a band: ignored
    stack = s2.read_band_files(tmp_path)
    assert stack.bands == ("B02", "B8A", "B09")
    assert stack.shape == (60, 60)
    assert stack.transform == Affine(10, 0, X0, 0, -10, Y0)
    ten = stack.band("B02")
    np.testing.assert_array_equal(ten, scene(10))  # the 10 m band is read as stored
    square10 = ten > 2000
    for band in ("B8A", "B09"):
        up = stack.band(band)
        assert np.isfinite(up).all()
        # bilinear puts more than half the contrast on the inner side of each edge and less on
        # the outer side, so through the middle the square covers exactly the same pixels...
        np.testing.assert_array_equal(up[30] > 2000, square10[30])
        np.testing.assert_array_equal(up[:, 24] > 2000, square10[:, 24])
        if band == "B8A":
            # (at 20 m even the corners stay above half: 0.75 * 0.75 > 0.5)
            np.testing.assert_array_equal(up > 2000, square10)
        # ...and its centroid is the same to a small fraction of a pixel
        rows, cols = np.nonzero(square10)
        wts = up - up.min()
        rr, cc = np.indices(up.shape)
        assert abs((wts * rr).sum() / wts.sum() - rows.mean()) < 0.05
        assert abs((wts * cc).sum() / wts.sum() - cols.mean()) < 0.05
        # the interior of the square is exactly bright
        assert (up[21:39, 15:33] == 3000).all()


def test_band_files_window_and_bounds_match_the_full_read(tmp_path):
    files = [write_raster(tmp_path / "x_B04.tif", scene(10), 10),
             write_raster(tmp_path / "x_B05.tif", scene(20), 20)]
    full = s2.read_band_files(files)
    part = s2.read_band_files(files, bounds=(X0 + 100, Y0 - 450, X0 + 400, Y0 - 150))
    assert part.shape == (30, 30)
    assert part.transform == Affine(10, 0, X0 + 100, 0, -10, Y0 - 150)
    np.testing.assert_allclose(part.array, full.array[:, 15:45, 10:40], rtol=0, atol=1e-3)
    win = s2.read_band_files(files, window=Window(10, 15, 30, 30))
    np.testing.assert_allclose(win.array, part.array, rtol=0, atol=1e-3)
    only = s2.read_band_files(files, bands=["B5"])
    assert only.bands == ("B05",)
    with pytest.raises(InvalidRequest, match=r"B12.*not found.*found B04, B05"):
        s2.read_band_files(files, bands=["B04", "B12"])
    with pytest.raises(InvalidRequest, match="do not overlap"):
        s2.read_band_files(files, bounds=(0, 0, 10, 10))


def test_band_files_nodata_is_not_interpolated_into_data(tmp_path):
    coarse = np.full((30, 30), 2000, np.uint16)
    coarse[10:12, 10:12] = 0  # a nodata hole in the 20 m band
    files = [write_raster(tmp_path / "a_B04.tif", np.full((60, 60), 1500, np.uint16), 10),
             write_raster(tmp_path / "a_B05.tif", coarse, 20)]
    up = s2.read_band_files(files).band("B05")
    finite = np.isfinite(up)
    assert not finite[20:24, 20:24].all()
    # valid pixels keep the valid value: nodata (0) is never averaged in
    assert (up[finite] == 2000).all()
    assert finite.sum() >= 60 * 60 - 6 * 6


def test_no_band_files_is_refused(tmp_path):
    write_raster(tmp_path / "image.tif", np.ones((3, 3), np.uint16), 10)
    with pytest.raises(InvalidRequest, match="no Sentinel-2 band files"):
        s2.read_band_files(tmp_path)


# ----------------------------------------------------------------------------- SAFE products

MTD_L1C = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd">
  <n1:General_Info><Product_Info>
    <PROCESSING_LEVEL>Level-1C</PROCESSING_LEVEL>
    <PRODUCT_TYPE>S2MSI1C</PRODUCT_TYPE>
    <PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>
  </Product_Info>
  <Product_Image_Characteristics>
    <QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>
    {offsets}
  </Product_Image_Characteristics></n1:General_Info>
</n1:Level-1C_User_Product>
"""

MTD_L2A = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
  <n1:General_Info><Product_Info>
    <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
    <PRODUCT_TYPE>S2MSI2A</PRODUCT_TYPE>
    <PROCESSING_BASELINE>04.00</PROCESSING_BASELINE>
  </Product_Info>
  <Product_Image_Characteristics>
    <BOA_ADD_OFFSET_VALUES_LIST>
      <BOA_ADD_OFFSET band_id="0">-1000</BOA_ADD_OFFSET>
      <BOA_ADD_OFFSET band_id="1">-1000</BOA_ADD_OFFSET>
    </BOA_ADD_OFFSET_VALUES_LIST>
  </Product_Image_Characteristics></n1:General_Info>
</n1:Level-2A_User_Product>
"""

SIZE_M = 240  # a tiny "tile": 24 px at 10 m, 12 at 20 m, 4 at 60 m


def fake_l1c_safe(root: Path, name: str, dn_offset: int, *, mtd_baseline=None) -> Path:
    """A .SAFE folder with the L1C layout; every band holds its reference mean + dn_offset."""
    safe = root / name
    img = safe / "GRANULE" / "L1C_T33TTG_A026000_20220301T101029" / "IMG_DATA"
    use_jp2 = jp2_available()
    ext, driver = (".jp2", "JP2OpenJPEG") if use_jp2 else (".tif", "GTiff")
    for band in s2b.L1C_ORDER:
        res = s2b.BANDS[band].gsd_m
        n = SIZE_M // res
        value = round(s2b.BANDS[band].mean) + dn_offset
        write_raster(img / f"T33TTG_20220301T101029_{band}{ext}",
                     np.full((n, n), value, np.uint16), res, driver=driver)
    write_raster(img / f"T33TTG_20220301T101029_TCI{ext}", np.zeros((3, 24, 24), np.uint8), 10,
                 driver=driver)
    if mtd_baseline is not None:
        offsets = "" if float(mtd_baseline) < 4 else "\n".join(
            f'<RADIO_ADD_OFFSET band_id="{i}">-1000</RADIO_ADD_OFFSET>' for i in range(13))
        (safe / "MTD_MSIL1C.xml").write_text(MTD_L1C.format(baseline=mtd_baseline,
                                                            offsets=offsets))
    return safe


def test_fake_l1c_safe_with_baseline_offset(tmp_path):
    # real JPEG 2000 files when rasterio's GDAL has the JP2OpenJPEG driver (it does in the
    # rasterio wheels); otherwise the same layout with .tif files
    safe = fake_l1c_safe(tmp_path, "S2B_MSIL1C_20220301T101029_N0400_R022_T33TTG_20220301T121545"
                                   ".SAFE", dn_offset=1000, mtd_baseline="04.00")
    stack = s2.read_band_files(safe)
    assert stack.bands == s2b.L1C_ORDER
    assert stack.shape == (24, 24)
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L1C", "04.00", True)
    x, valid, warnings = s2b.to_model_input(stack)
    assert x.shape == (10, 24, 24) and valid.all()
    # DN = round(mean) + 1000; after removing the offset it is within 0.5 DN of the mean
    assert (x == np.float32(127 / 255)).all()
    assert warnings == []


def test_baseline_from_safe_name_alone(tmp_path):
    safe = fake_l1c_safe(tmp_path, "S2A_MSIL1C_20210615T101031_N0300_R022_T33TTG_20210615T121545"
                                   ".SAFE", dn_offset=0)
    stack = s2.read_band_files(safe, bands=s2b.MODEL_BANDS)
    assert stack.bands == s2b.MODEL_BANDS
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L1C", "03.00", False)
    x, valid, _ = s2b.to_model_input(stack)
    assert (x == np.float32(127 / 255)).all()
    # the user stating a baseline overrides the product name
    stack = s2.read_band_files(safe, bands=s2b.MODEL_BANDS, baseline="04.00")
    assert stack.offset_applied
    x, _, _ = s2b.to_model_input(stack)
    assert (x < np.float32(127 / 255)).all()


def test_multiple_granules_are_refused(tmp_path):
    safe = tmp_path / "S2A_OPER_PRD_MSIL1C.SAFE" / "GRANULE"
    (safe / "G1" / "IMG_DATA").mkdir(parents=True)
    (safe / "G2" / "IMG_DATA").mkdir(parents=True)
    with pytest.raises(InvalidRequest, match="2 granules"):
        s2.read_band_files(safe.parent)


def test_fake_l2a_safe_takes_native_resolutions_and_warns(tmp_path):
    safe = tmp_path / "S2A_MSIL2A_20220615T101031_N0400_R022_T33TTG_20220615T121545.SAFE"
    img = safe / "GRANULE" / "L2A_T33TTG_A036000_20220615T101029" / "IMG_DATA"
    use_jp2 = jp2_available()
    ext, driver = (".jp2", "JP2OpenJPEG") if use_jp2 else (".tif", "GTiff")
    # L2A ships the 10 m bands resampled at 20 m and 60 m too, and 20 m bands at 60 m; mark
    # each copy so that the test sees which one was read
    for band in s2b.L2A_ORDER:
        native = s2b.BANDS[band].gsd_m
        for res in (10, 20, 60):
            if res < native or (res == 10 and native != 10):
                continue
            n = SIZE_M // res
            value = round(s2b.BANDS[band].mean) + 1000 + (0 if res == native else 777)
            write_raster(img / f"R{res}m" / f"T33TTG_20220615T101029_{band}_{res}m{ext}",
                         np.full((n, n), value, np.uint16), res, driver=driver)
    write_raster(img / "R20m" / f"T33TTG_20220615T101029_SCL_20m{ext}",
                 np.full((12, 12), 4, np.uint8), 20, driver=driver)
    (safe / "MTD_MSIL2A.xml").write_text(MTD_L2A)

    stack = s2.read_band_files(safe)
    assert stack.bands == s2b.L2A_ORDER
    assert (stack.level, stack.baseline, stack.offset_applied) == ("L2A", "04.00", True)
    for band in s2b.L2A_ORDER:
        assert (stack.band(band) == round(s2b.BANDS[band].mean) + 1000).all(), band
    x, valid, warnings = s2b.to_model_input(stack)
    assert x.shape == (10, 24, 24) and valid.all()
    assert (x == np.float32(127 / 255)).all()
    assert len(warnings) == 1 and "Level-2A" in warnings[0] and "Level-1C" in warnings[0]


# ----------------------------------------------------------------------------- radiometry


def test_normalise_bands_golden_numbers():
    b4 = s2b.BANDS["B04"]
    dn = np.array([b4.mean, b4.lo, b4.hi, b4.lo - 500, b4.hi + 500, b4.mean + b4.std, 2000.0,
                   np.nan])[None, None, :]
    out = s2b.normalise_bands(dn.reshape(1, 1, -1), ["B4"])[0, 0]
    assert out.dtype == np.float32
    # mean -> 127.5 truncated to 127; lo -> 0; hi -> 255; outside clipped; mean + std -> 191.25
    # -> 191; DN 2000 -> 184.55 -> 184; NaN is treated as the mean
    expected = np.array([127, 0, 255, 0, 255, 191, 184, 127], np.float32) / np.float32(255)
    np.testing.assert_array_equal(out, expected)
    # B02 DN 1000: (1000 - (1184.3824625 - 2 * 650.2842772)) / (4 * 650.2842772) * 255 = 109.42
    assert s2b.normalise_bands(np.array([[[1000.0]]]), ["B02"])[0, 0, 0] == np.float32(109 / 255)
    with pytest.raises(InvalidRequest, match="2 bands given but 1"):
        s2b.normalise_bands(np.zeros((2, 1, 1)), ["B02"])


def test_model_bands_matches_the_reference_recipe():
    rng = np.random.default_rng(0)
    dn = rng.integers(1, 6000, size=(13, 9, 11)).astype(np.uint16)
    # the reference, literally: stretch all 13 with uint8 truncation, swap 1..3, drop 0, 9, 10
    mean = np.array([s2b.BANDS[b].mean for b in s2b.L1C_ORDER])[:, None, None]
    std = np.array([s2b.BANDS[b].std for b in s2b.L1C_ORDER])[:, None, None]
    lo, hi = mean - 2 * std, mean + 2 * std
    ref = (np.clip((dn - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8) / 255).astype(
        np.float32)
    ref[[1, 2, 3]] = ref[[3, 2, 1]]
    ref = np.delete(ref, [0, 9, 10], axis=0)
    np.testing.assert_array_equal(s2b.model_bands(dn, s2b.L1C_ORDER), ref)
    # the same through a stack (no offset, L1C, baseline known: no warnings)
    stack = make_stack(dict(zip(s2b.L1C_ORDER, dn.astype(np.float32))), level="L1C",
                       baseline="03.01")
    x, valid, warnings = s2b.to_model_input(stack)
    np.testing.assert_array_equal(x, ref)
    assert valid.all() and warnings == []


def test_baseline_offset_is_removed():
    bands = {b: np.full((2, 2), s2b.BANDS[b].mean + 1000) for b in s2b.MODEL_BANDS}
    new = make_stack(bands, level="L1C", baseline="04.00", offset_applied=True)
    x, _, _ = s2b.to_model_input(new)
    assert (x == np.float32(127 / 255)).all()
    old = make_stack(bands, level="L1C", baseline="03.01", offset_applied=False)
    x_old, _, _ = s2b.to_model_input(old)
    assert (x_old > np.float32(127 / 255)).all()


def test_missing_model_band_names_missing_and_found():
    stack = make_stack({b: np.ones((2, 2)) for b in ("B02", "B03", "B04", "B08")})
    with pytest.raises(InvalidRequest) as err:
        s2b.to_model_input(stack)
    msg = str(err.value)
    assert "missing: B05, B06, B07, B8A, B11, B12" in msg
    assert "found: B02, B03, B04, B08" in msg


def test_unknown_level_and_baseline_warn():
    stack = make_stack({b: np.full((2, 2), 1500.0) for b in s2b.MODEL_BANDS})
    _, _, warnings = s2b.to_model_input(stack)
    assert any("product level is unknown" in w and "--level L2A" in w for w in warnings)  # the CLI's own flags
    assert any("baseline is unknown" in w and "--baseline 04.00" in w for w in warnings)
    l2a = make_stack({b: np.full((2, 2), 1500.0) for b in s2b.MODEL_BANDS}, level="L2A",
                     baseline="03.00")
    _, _, warnings = s2b.to_model_input(l2a)
    assert len(warnings) == 1 and "Level-2A" in warnings[0]
