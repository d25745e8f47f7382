"""A real server on loopback with --allowed-root: inputs are confined by what GDAL would open."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds

from ..conftest import recording_http_server
from .conftest import call, start_server, stop_server, wait_for

BOUNDS = (583000, 4507000, 583640, 4507640)


def _tif(path: Path, value: int, count: int = 3) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=count, dtype="uint8", nodata=0,
                       crs="EPSG:32618", transform=from_bounds(*BOUNDS, 64, 64)) as dst:
        data = np.full((count, 64, 64), value, dtype="uint8")
        data[:, 20:30, 20:30] = 0
        dst.write(data)
    return path


def _vrt(sources: list[str]) -> str:
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i}"><NoDataValue>0</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{src}</SourceFilename><SourceBand>{i}</SourceBand>'
        f"</SimpleSource></VRTRasterBand>" for i, src in enumerate(sources, start=1))
    return (f'<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:32618</SRS>'
            f"<GeoTransform>583000,10,0,4507640,0,-10</GeoTransform>{bands}</VRTDataset>")


@pytest.fixture(scope="module")
def hits():
    with recording_http_server() as server:
        yield server


@pytest.fixture(scope="module")
def confined(tmp_path_factory, hits):
    tmp = tmp_path_factory.mktemp("confined")
    inside, outside = tmp / "inside", tmp / "outside"
    inside.mkdir()
    outside.mkdir()
    secret = _tif(outside / "secret.tif", 77)
    files = {"good": _tif(inside / "good.tif", 120)}
    for name in ("pointer.vrt", "pointer.tif"):
        (inside / name).write_text(_vrt([str(secret)] * 3))
        files[name] = inside / name
    key = outside / "key.txt"
    key.write_bytes(b"SECRET" * 2000)
    raw = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i}" subClass="VRTRawRasterBand"><SourceFilename '
        f'relativetoVRT="0">{key}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset>'
        f"<LineOffset>64</LineOffset></VRTRasterBand>" for i in (1, 2, 3))
    (inside / "raw.vrt").write_text(_vrt([]).replace("</VRTDataset>", raw + "</VRTDataset>"))
    files["raw"] = inside / "raw.vrt"
    (inside / "remote.vrt").write_text(_vrt([f"/vsicurl/{hits[0]}/x.tif"] * 3))
    files["remote"] = inside / "remote.vrt"
    (inside / "link.tif").symlink_to(secret)
    files["link"] = inside / "link.tif"
    img = inside / "S2A_MSIL1C_20210615T154911_N0300_R054_T18TWL_20210615T191103.SAFE" / "GRANULE" / "L1C_T18TWL" / "IMG_DATA"
    img.mkdir(parents=True)
    for band in ("B02", "B03", "B04", "B08"):
        b = _tif(outside / f"{band}.tif", 50, count=1)
        (img / f"T18TWL_20210615T154911_{band}.jp2").symlink_to(b)
    files["safe"] = img.parents[2]
    # allowed VRT: all sources inside
    _tif(inside / "src.tif", 90)
    (inside / "ok.vrt").write_text(_vrt([str(inside / "src.tif")] * 3))
    files["ok"] = inside / "ok.vrt"
    srv = start_server(tmp, "--allowed-root", str(inside))
    (tmp / "second").mkdir()
    srv_vrt = start_server(tmp / "second", "--allowed-root", str(inside), "--allow-vrt")
    yield srv, srv_vrt, files, inside
    assert stop_server(srv) == 0
    assert stop_server(srv_vrt) == 0


@pytest.mark.parametrize("name", ["pointer.vrt", "pointer.tif", "raw", "remote", "link"])
@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
def test_indirect_inputs_are_403(confined, hits, name, endpoint):
    srv, srv_vrt, files, inside = confined
    for server in (srv, srv_vrt):
        reply = call(server, "POST", endpoint, json_body={"task": "inpaint", "input": str(files[name]),
                                                          "steps": 1, "seed": 1})
        assert reply.status == 403, reply.body
        body = reply.json
        # a plain link out of the roots is caught by the path check already
        assert body["code"] == ("path_not_allowed" if name == "link" else "input_refused")
        assert files[name].name in body["detail"] and str(inside) in body["detail"]
    assert hits[1] == []  # no outbound request from either server


def test_vrt_mask_is_refused(confined):
    srv, _, files, inside = confined
    reply = call(srv, "POST", "/v1/jobs", json_body={"task": "inpaint", "input": str(files["good"]),
                                                     "mask": str(files["pointer.tif"]), "steps": 1})
    assert reply.status == 403 and "pointer.tif" in reply.json["detail"]


@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
def test_safe_with_linked_bands_is_403(confined, endpoint):
    srv, _, files, inside = confined
    reply = call(srv, "POST", endpoint, json_body={"task": "superres", "input": str(files["safe"]), "steps": 1})
    assert reply.status == 403, reply.body
    assert reply.json["code"] == "input_refused" and "outside" in reply.json["detail"]


def test_vrt_inside_the_roots_needs_allow_vrt(confined):
    srv, srv_vrt, files, _ = confined
    body = {"task": "inpaint", "input": str(files["ok"]), "steps": 1, "seed": 1, "date": "2021-06-15"}
    reply = call(srv, "POST", "/v1/plan", json_body=body)
    assert reply.status == 403 and "--allow-vrt" in reply.json["detail"]
    assert call(srv_vrt, "POST", "/v1/plan", json_body=body).status == 200


def test_job_result_tags_carry_no_server_paths(confined, tmp_path):
    srv, _, files, inside = confined
    reply = call(srv, "POST", "/v1/jobs", json_body={"task": "inpaint", "input": str(files["good"]), "steps": 1,
                                                     "seed": 1, "date": "2021-06-15"})
    assert reply.status == 202, reply.body
    job = wait_for(srv, reply.json["id"], timeout=120)
    assert job["state"] == "done", job
    out = tmp_path / "r.tif"
    out.write_bytes(call(srv, "GET", job["result"]["result_url"]).body)
    with rasterio.open(out) as src:
        tags = src.tags()
    assert tags["input"] == "good.tif" and tags["mask"] == "nodata"
    assert str(inside) not in " ".join(tags.values())


def test_hf_models_need_allow_hf(confined):
    srv, _, _, _ = confined
    reply = call(srv, "POST", "/v1/jobs", json_body={"task": "generate", "bbox": list(BOUNDS), "crs": "EPSG:32618",
                                                     "width": 64, "height": 64, "model": "hf:someone/model"})
    assert reply.status == 403 and "--allow-hf" in reply.json["detail"]


def _tif_without_crs(path: Path, value: int) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", nodata=0,
                       transform=from_bounds(*BOUNDS, 64, 64)) as dst:
        data = np.full((3, 64, 64), value, dtype="uint8")
        data[:, 20:30, 20:30] = 0
        dst.write(data)
    return path


def test_a_crs_assigned_in_qgis_runs_on_a_confined_server(confined, tmp_path):
    """The engine reads such an input through a VRT of its own: that VRT is not a client's VRT
    (it is allowed without --allow-vrt), and the file it reads is confined as any input."""
    srv, _, files, inside = confined
    plain = _tif_without_crs(inside / "nocrs.tif", 100)
    body = {"task": "inpaint", "input": str(plain), "steps": 1, "seed": 1, "date": "2021-06-15",
            "input_crs": "EPSG:32618"}
    without = call(srv, "POST", "/v1/plan", json_body={k: v for k, v in body.items() if k != "input_crs"})
    assert without.status == 422 and "CRS" in without.body.decode(), without.body
    assert call(srv, "POST", "/v1/plan", json_body=body).status == 200
    reply = call(srv, "POST", "/v1/jobs", json_body=body)
    assert reply.status == 202, reply.body
    job = wait_for(srv, reply.json["id"], timeout=120)
    assert job["state"] == "done", job
    out = tmp_path / "assigned.tif"
    out.write_bytes(call(srv, "GET", job["result"]["result_url"]).body)
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 32618
    # the same request for a file outside the roots is still refused
    outside = _tif_without_crs(tmp_path / "nocrs_outside.tif", 100)
    refused = call(srv, "POST", "/v1/jobs", json_body={**body, "input": str(outside)})
    assert refused.status == 403, refused.body


def _overview_file_in_tag(path: Path, target: str) -> Path:
    """A plain GeoTIFF whose own metadata tag names an overview file (GDAL opens it by itself)."""
    _tif(path, 120)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(ns="OVERVIEWS", OVERVIEW_FILE=target)
    assert not path.with_name(path.name + ".aux.xml").exists()  # in the file itself, not a side file
    return path


@pytest.mark.parametrize("how", ["tag", "aux.xml", "ovr", "msk", "tag_outside", "assigned_crs"])
@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
def test_side_files_gdal_opens_by_itself_are_confined(confined, hits, tmp_path, how, endpoint):
    """External overviews (.ovr, OVERVIEW_FILE in the file's metadata or its .aux.xml) and masks
    (.msk) are opened by GDAL with any driver: a GeoTIFF in the roots must not make the server
    fetch a URL or read a file outside the roots through them (also a GeoTIFF upload)."""
    srv, _, _, inside = confined
    url = f"/vsicurl/{hits[0]}/side-{how}-{endpoint[4:]}.tif"
    folder = inside / f"side-{how}-{endpoint[4:]}"
    folder.mkdir()
    name = folder / "plain.tif"
    if how in ("tag", "assigned_crs"):
        _overview_file_in_tag(name, url)
    elif how == "tag_outside":
        _overview_file_in_tag(name, str(tmp_path / "elsewhere.tif"))
        _tif(tmp_path / "elsewhere.tif", 77)
    else:
        _tif(name, 120)
        side = {"aux.xml": name.with_name("plain.tif.aux.xml"), "ovr": name.with_name("plain.tif.ovr"),
                "msk": name.with_name("plain.tif.msk")}[how]
        if how == "aux.xml":
            side.write_text(f'<PAMDataset><Metadata domain="OVERVIEWS"><MDI key="OVERVIEW_FILE">{url}</MDI>'
                            "</Metadata></PAMDataset>")
        else:
            side.write_text(_vrt([url] * (1 if how == "msk" else 3)))
    body = {"task": "inpaint", "input": str(name), "steps": 1, "seed": 1, "date": "2021-06-15"}
    if how == "assigned_crs":
        body["input_nodata"] = 0
    before = len(hits[1])
    reply = call(srv, "POST", endpoint, json_body=body)
    assert reply.status == 403, reply.body
    assert reply.json["code"] == "input_refused" and "plain.tif" in reply.json["detail"]
    assert hits[1][before:] == []  # no outbound request


def test_an_upload_naming_a_remote_overview_fetches_nothing(confined, hits, tmp_path):
    srv, _, _, _ = confined
    tif = _overview_file_in_tag(tmp_path / "up.tif", f"/vsicurl/{hits[0]}/upload-overview.tif")
    reply = call(srv, "POST", "/v1/uploads", data=tif.read_bytes(), headers={"Content-Type": "image/tiff"})
    assert reply.status in (200, 201), reply.body
    before = len(hits[1])
    job = call(srv, "POST", "/v1/jobs", json_body={"task": "inpaint", "input": reply.json["path_ref"], "steps": 1,
                                                   "seed": 1, "date": "2021-06-15"})
    assert job.status == 403, job.body
    assert hits[1][before:] == []


@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
def test_an_assigned_crs_is_never_a_file_or_a_url(confined, hits, tmp_path, endpoint):
    """GDAL's CRS parser takes a file name (and reads it) or a URL (and fetches it); an
    ``input_crs`` is parsed as PROJ does, which does neither."""
    srv, _, _, inside = confined
    plain = inside / "nocrs.tif"
    if not plain.exists():
        _tif_without_crs(plain, 100)
    wkt = tmp_path / "secret_crs.wkt"  # outside the roots
    wkt.write_text('GEOGCS["x",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
                   'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]]')
    before = len(hits[1])
    for crs in (f"{hits[0]}/input-crs", str(wkt)):
        reply = call(srv, "POST", endpoint, json_body={"task": "inpaint", "input": str(plain), "steps": 1,
                                                       "date": "2021-06-15", "input_crs": crs})
        assert reply.status == 422, reply.body
        assert reply.json["code"] == "invalid_request" and "input_crs" in reply.json["detail"], reply.body
    assert hits[1][before:] == []


def _geojson_mask(path: Path, crs: dict) -> Path:
    ring = [[583100, 4507100], [583300, 4507100], [583300, 4507300], [583100, 4507100]]
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    return path


@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
def test_a_geojson_mask_with_a_linked_crs_fetches_nothing(confined, hits, endpoint):
    """OGR fetches the href of a GeoJSON ``"crs": {"type": "link"}``: such a mask is a 403."""
    srv, _, files, inside = confined
    mask = _geojson_mask(inside / f"linked-{endpoint[4:]}.geojson",
                         {"type": "link", "properties": {"href": f"{hits[0]}/geojson-crs", "type": "ogcwkt"}})
    before = len(hits[1])
    reply = call(srv, "POST", endpoint, json_body={"task": "inpaint", "input": str(files["good"]), "mask": str(mask),
                                                   "steps": 1, "date": "2021-06-15"})
    assert reply.status == 403, reply.body
    assert reply.json["code"] == "input_refused" and mask.name in reply.json["detail"]
    assert hits[1][before:] == []
    named = _geojson_mask(inside / f"named-{endpoint[4:]}.geojson",
                          {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}})
    reply = call(srv, "POST", "/v1/plan", json_body={"task": "inpaint", "input": str(files["good"]),
                                                     "mask": str(named), "steps": 1, "date": "2021-06-15"})
    assert reply.status == 200, reply.body


def _tile_index(path: Path, location: str) -> Path:
    """A GDAL tile index (GTI) GeoPackage: one footprint whose tile is the file at ``location``."""
    import shapely
    from pyogrio.raw import write

    write(str(path), geometry=np.array([shapely.to_wkb(shapely.box(*BOUNDS))], dtype=object),
          field_data=[np.array([location], dtype=object)], fields=["location"], geometry_type="Polygon",
          crs="EPSG:32618", driver="GPKG")
    return path


@pytest.mark.parametrize("source", ["tile_index", "remote_overview"])
def test_allowed_vrt_sources_are_opened_as_inputs_are(confined, hits, source):
    """With --allow-vrt, GDAL opens a VRT's sources with any driver: a tile index GeoPackage inside
    the roots read the file it lists (outside), a GeoTIFF naming a remote overview fetched it."""
    _, srv_vrt, _, inside = confined
    folder = inside / f"vrt-source-{source}"
    folder.mkdir()
    if source == "tile_index":
        secret = folder.parent.parent / "outside" / "secret.tif"
        src = _tile_index(folder / "index.gti.gpkg", str(secret))
    else:
        src = _overview_file_in_tag(folder / "plain.tif", f"/vsicurl/{hits[0]}/vrt-source-overview.tif")
    vrt = folder / "mosaic.vrt"
    vrt.write_text(_vrt([str(src)] * 3))
    before = len(hits[1])
    for endpoint in ("/v1/plan", "/v1/jobs"):
        reply = call(srv_vrt, "POST", endpoint, json_body={"task": "inpaint", "input": str(vrt), "steps": 1,
                                                           "seed": 1, "date": "2021-06-15"})
        assert reply.status == 403, reply.body
        assert reply.json["code"] == "input_refused" and src.name in reply.json["detail"], reply.body
    assert hits[1][before:] == []
