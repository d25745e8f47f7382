"""engine.geo.guard: what a server input *is* decides whether it is opened (real GDAL, real files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds

from engine.errors import InputRefused, InvalidRequest
from engine.geo.guard import (
    InputPolicy,
    check_output,
    display_name,
    display_text,
    enforce,
    inspect_input,
    open_raster,
)

from ..conftest import recording_http_server

BOUNDS = (583000, 4507000, 583080, 4507080)


def _tif(path: Path, value: int = 77, count: int = 3) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=count, dtype="uint8",
                       crs="EPSG:32618", transform=from_bounds(*BOUNDS, 8, 8)) as dst:
        dst.write(np.full((count, 8, 8), value, dtype="uint8"))
    return path


def _vrt(source: str, *, relative: bool = False, band_xml: str = "") -> str:
    band = band_xml or (
        f'<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="{int(relative)}">{source}</SourceFilename><SourceBand>1</SourceBand>'
        f"</SimpleSource></VRTRasterBand>")
    return (f'<VRTDataset rasterXSize="8" rasterYSize="8"><SRS>EPSG:32618</SRS>'
            f"<GeoTransform>583000,10,0,4507080,0,-10</GeoTransform>{band}</VRTDataset>")


@pytest.fixture
def place(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    return inside, outside, InputPolicy(roots=(inside,))


def _refused(path, policy, *words):
    with enforce(policy), pytest.raises(InputRefused) as info:
        open_raster(path)
    for word in words:
        assert word in str(info.value)
    from engine.server.errors import error_code, error_status

    assert error_status(info.value) == 403 and error_code(info.value) == "input_refused"
    return info.value


def test_plain_geotiff_inside_opens(place):
    inside, _, policy = place
    with enforce(policy), open_raster(_tif(inside / "a.tif", 5)) as src:
        assert src.read(1)[0, 0] == 5


def test_vrt_to_an_outside_file_is_refused_also_when_named_tif(place):
    inside, outside, policy = place
    secret = _tif(outside / "secret.tif")
    for name in ("pointer.vrt", "pointer.tif"):
        (inside / name).write_text(_vrt(str(secret)))
        with rasterio.open(inside / name) as src:  # without a policy GDAL follows it (the attack)
            assert src.read(1)[0, 0] == 77
        err = _refused(inside / name, policy, name, str(inside), "VRT")
        assert err.path.endswith(name) and str(inside) in err.roots
    # --allow-vrt does not let a VRT read outside the roots
    _refused(inside / "pointer.tif", InputPolicy(roots=(inside,), allow_vrt=True), str(secret), "outside")


def test_allowed_vrt_with_inside_sources_reads_them(place):
    inside, _, _ = place
    _tif(inside / "a.tif", 9)
    (inside / "ok.vrt").write_text(_vrt("a.tif", relative=True))
    with enforce(InputPolicy(roots=(inside,), allow_vrt=True)), open_raster(inside / "ok.vrt") as src:
        assert src.read(1)[0, 0] == 9
    _refused(inside / "ok.vrt", InputPolicy(roots=(inside,)), "--allow-vrt")


def test_nested_vrt_is_checked_through(place):
    inside, outside, _ = place
    secret = _tif(outside / "secret.tif")
    (inside / "inner.tif").write_text(_vrt(str(secret)))  # a VRT disguised as a GeoTIFF
    (inside / "outer.vrt").write_text(_vrt("inner.tif", relative=True))
    _refused(inside / "outer.vrt", InputPolicy(roots=(inside,), allow_vrt=True), "outside")


def test_raw_band_vrt_is_refused(place):
    inside, outside, _ = place
    private = outside / "id_rsa"
    private.write_bytes(b"-----BEGIN PRIVATE KEY-----" + bytes(range(256)))
    band = (f'<VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">'
            f'<SourceFilename relativetoVRT="0">{private}</SourceFilename><ImageOffset>0</ImageOffset>'
            f"<PixelOffset>1</PixelOffset><LineOffset>8</LineOffset></VRTRasterBand>")
    (inside / "raw.vrt").write_text(_vrt("", band_xml=band))
    with rasterio.open(inside / "raw.vrt") as src:  # GDAL alone maps the file's bytes to pixels
        assert bytes(src.read(1).ravel()[:5]) == b"-----"
    _refused(inside / "raw.vrt", InputPolicy(roots=(inside,)), "VRT")
    # even with VRTs allowed and the file inside the roots, a raw band is not a raster
    (inside / "key").write_bytes(private.read_bytes())
    (inside / "raw2.vrt").write_text(_vrt("", band_xml=band.replace(str(private), str(inside / "key"))))
    _refused(inside / "raw2.vrt", InputPolicy(roots=(inside,), allow_vrt=True), "VRTRawRasterBand")


@pytest.fixture
def http_hits():
    """A loopback HTTP server that records every request it gets."""
    with recording_http_server() as server:
        yield server


def test_vsicurl_source_makes_no_request(place, http_hits):
    inside, _, _ = place
    url, hits = http_hits
    (inside / "remote.vrt").write_text(_vrt(f"/vsicurl/{url}/x.tif"))
    with pytest.raises(rasterio.errors.RasterioIOError):  # without a policy GDAL does call out
        with rasterio.open(inside / "remote.vrt") as src:
            src.read(1)
    assert hits, "the loopback server should have seen GDAL's request"
    hits.clear()
    for policy in (InputPolicy(roots=(inside,)), InputPolicy(roots=(inside,), allow_vrt=True), InputPolicy()):
        _refused(inside / "remote.vrt", policy, "remote.vrt")
        with pytest.raises(InputRefused):
            inspect_input(inside / "remote.vrt", policy)
        _refused(f"/vsicurl/{url}/y.tif", policy, "virtual file system")
    assert hits == []


def test_symlink_out_of_the_roots_is_refused(place):
    inside, outside, policy = place
    secret = _tif(outside / "secret.tif")
    (inside / "link.tif").symlink_to(secret)
    _refused(inside / "link.tif", policy, "link.tif", str(secret), "outside")


def test_sidecar_link_out_of_the_roots_is_refused(place):
    inside, outside, policy = place
    image = _tif(inside / "img.tif")
    ovr = outside / "stolen.ovr"
    _tif(ovr, 1)
    (inside / "img.tif.ovr").symlink_to(ovr)
    with rasterio.open(image) as src:
        assert any(f.endswith(".ovr") for f in src.files)
    _refused(image, policy, str(ovr))


def test_safe_folder_with_linked_band_files_is_refused(place):
    inside, outside, policy = place
    granule = inside / "S2A_MSIL1C_20210615T000000_N0300_R001_T18TWL_20210615T000000.SAFE" / "GRANULE" / "G" / "IMG_DATA"
    granule.mkdir(parents=True)
    for band in ("B02", "B03", "B04"):
        (granule / f"T18TWL_20210615T000000_{band}.jp2").symlink_to(_tif(outside / f"{band}.tif"))
    safe = granule.parents[2]
    with pytest.raises(InputRefused, match="outside") as info:
        inspect_input(safe, policy)
    assert str(outside) in str(info.value)
    with enforce(policy), pytest.raises(InputRefused):
        from engine.geo.sentinel2 import band_files_grid

        band_files_grid(safe, 10, bands=("B02", "B03", "B04"))


def test_vector_masks(place):
    inside, outside, policy = place
    import pyogrio  # noqa: F401

    from engine.geo.guard import inspect_vector

    gj = inside / "m.geojson"
    gj.write_text('{"type": "FeatureCollection", "features": []}')
    with enforce(policy):
        assert inspect_vector(gj) == str(gj.resolve())
    ogr_vrt = inside / "m.vrt"
    ogr_vrt.write_text(f"<OGRVRTDataSource><OGRVRTLayer name='x'><SrcDataSource>{outside}/a.shp"
                       "</SrcDataSource></OGRVRTLayer></OGRVRTDataSource>")
    kml = inside / "m.kml"
    kml.write_text("<kml><NetworkLink><Link><href>http://127.0.0.1:9/x.kml</href></Link></NetworkLink></kml>")
    for path in (ogr_vrt, kml):
        with enforce(policy), pytest.raises(InputRefused, match="GeoPackage, shapefile"):
            inspect_vector(path)
    shp = inside / "m.shp"
    shp.write_bytes(b"\x00\x00\x27\x0a" + bytes(96))
    (inside / "m.dbf").symlink_to(outside / "other.dbf")
    with enforce(policy), pytest.raises(InputRefused, match="other.dbf"):
        inspect_vector(shp)


def test_no_policy_changes_nothing(place):
    inside, outside, _ = place
    (inside / "p.vrt").write_text(_vrt(str(_tif(outside / "s.tif", 3))))
    with open_raster(inside / "p.vrt") as src:  # the CLI user's own files: VRTs work
        assert src.read(1)[0, 0] == 3
    assert display_name(inside / "p.vrt") == str(inside / "p.vrt")


def test_display_names_hide_server_folders(tmp_path):
    uploads = tmp_path / "work" / "uploads"
    uploads.mkdir(parents=True)
    policy = InputPolicy(roots=(tmp_path,), uploads=uploads)
    with enforce(policy):
        assert display_name(uploads / ("a" * 32 + ".tif")) == "upload:" + "a" * 32
        assert display_name(tmp_path / "data" / "scene.tif") == "scene.tif"
        assert display_name("nodata") == "nodata"
        assert display_text("UNet /srv/m/x/unet; vae /srv/m/x/vae") == "UNet unet; vae vae"
    assert display_text("UNet /srv/m/x/unet") == "UNet /srv/m/x/unet"  # the CLI: as it is


def test_check_output_refuses_inputs_and_existing_files(tmp_path):
    a = _tif(tmp_path / "a.tif")
    with pytest.raises(InvalidRequest, match="is the input"):
        check_output(a, [a])
    link = tmp_path / "link.tif"
    link.symlink_to(a)
    hard = tmp_path / "hard.tif"
    os.link(a, hard)
    for out in (link, hard, tmp_path / "." / "a.tif"):
        with pytest.raises(InvalidRequest, match="is the input"):
            check_output(out, [a], overwrite=True)
    safe = tmp_path / "X.SAFE"
    safe.mkdir()
    with pytest.raises(InvalidRequest, match="inside the input folder"):
        check_output(safe / "out.tif", [safe])
    other = _tif(tmp_path / "other.tif")
    with pytest.raises(InvalidRequest, match="already exists.*--overwrite"):
        check_output(other, [a], overwrite=False)
    check_output(other, [a], overwrite=True)
    with pytest.raises(InvalidRequest, match="spread"):
        check_output(tmp_path / "new.tif", [], sidecars=[_tif(tmp_path / "new.spread.tif")], overwrite=False)
    check_output(tmp_path / "new2.tif", [a], overwrite=False)


def test_a_job_under_the_policy_reads_nothing_from_a_vrt(place):
    """The readers themselves are confined (not only the server's submit check): a job whose input
    became a VRT after it was accepted fails with InputRefused and writes nothing."""
    from engine.tasks import parse_request, run_task

    inside, outside, policy = place
    secret = _tif(outside / "secret.tif")
    (inside / "scene.tif").write_text(_vrt(str(secret)))
    out = inside / "out.tif"
    request = parse_request({"task": "inpaint", "input": str(inside / "scene.tif"), "model": "tiny", "steps": 1,
                             "seed": 1})
    with enforce(policy), pytest.raises(InputRefused, match="scene.tif"):
        run_task(request, out)
    assert sorted(p.name for p in inside.iterdir()) == ["scene.tif"]


def test_vrt_element_case_does_not_bypass(tmp_path):
    root = tmp_path / "inside"
    root.mkdir()
    secret = _tif(tmp_path / "secret.tif", 66)
    policy = InputPolicy(roots=(root,), allow_vrt=True)
    # GDAL matches VRT element and attribute names regardless of case
    (root / "upper.vrt").write_text(_vrt(str(secret)).replace("SourceFilename", "SOURCEFILENAME"))
    with rasterio.open(root / "upper.vrt") as src:
        assert src.read(1)[0, 0] == 66
    _refused(root / "upper.vrt", policy, "outside")
    band = ('<VRTRasterBand dataType="Byte" band="1" SUBCLASS="VRTRawRasterBand"><SourceFilename>'
            f'{root / "upper.vrt"}</SourceFilename></VRTRasterBand>')
    (root / "raw.vrt").write_text(_vrt("", band_xml=band))
    _refused(root / "raw.vrt", policy, "VRTRawRasterBand")
