"""Training data: GeoTIFF-derived metadata, shard layouts, captions, deterministic resumable order."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyproj
import pytest
import torch

from engine.cli import main
from engine.errors import InvalidRequest
from training.datasets import Transform, open_source
from training.datasets.captions import CORE, Caption, fmow_caption
from training.datasets.geotiff import GeoTiffFolder, find_geotiffs
from training.datasets.samples import metadata_from_record, parse_superres_sample, parse_temporal_sample
from training.datasets.shards import ShardWriter, expand_braces, iter_tar_samples
from training.datasets.stream import MapSource, TrainingStream

from .conftest import GEO, QA, UTM

GEOD = pyproj.Geod(ellps="WGS84")


def _crop(folder, name):
    ds = GeoTiffFolder(find_geotiffs([folder / name]), crop_size=32)
    return ds, ds.load(0, None)


def _gsd(lon_w, lon_e, lat_mid, lon_mid, lat_s, lat_n, px):
    """Geometric mean of the geodesic mid-line lengths / px (an independent computation)."""
    width = GEOD.inv(lon_w, lat_mid, lon_e, lat_mid)[2]
    height = GEOD.inv(lon_mid, lat_s, lon_mid, lat_n)[2]
    return float(np.sqrt(width / px * height / px))


def test_utm_crop_metadata_matches_its_georeferencing(geotiffs):
    ds, ex = _crop(geotiffs, UTM["name"])
    assert len(ds) == 4  # 64 px raster, 32 px grid crops
    to_ll = pyproj.Transformer.from_crs(UTM["crs"], "EPSG:4326", always_xy=True)
    w, n, span = UTM["west"], UTM["north"], 32 * UTM["pixel"]
    lon, lat = to_ll.transform(w + span / 2, n - span / 2)
    assert ex.metadata.lon_deg == pytest.approx(lon, abs=1e-6)
    assert ex.metadata.lat_deg == pytest.approx(lat, abs=1e-6)
    lon_w, _ = to_ll.transform(w, n - span / 2)
    lon_e, _ = to_ll.transform(w + span, n - span / 2)
    _, lat_s = to_ll.transform(w + span / 2, n - span)
    _, lat_n = to_ll.transform(w + span / 2, n)
    expected = _gsd(lon_w, lon_e, lat, lon, lat_s, lat_n, 32)
    assert ex.metadata.gsd_m == pytest.approx(expected, rel=1e-3)
    assert ex.metadata.gsd_m == pytest.approx(UTM["pixel"], rel=2e-3)  # UTM scale factor < 0.1 %
    assert ex.metadata.date == UTM["date"]  # from the Sentinel-2 style file name
    assert ex.metadata.cloud_cover is None  # no QA band, no sidecar: unknown
    assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.float32
    # the crop at row 32, col 32 is the south-east quarter
    south_east = ds.load(3, None)
    lon2, lat2 = to_ll.transform(w + 1.5 * span, n - 1.5 * span)
    assert (south_east.metadata.lon_deg, south_east.metadata.lat_deg) == pytest.approx((lon2, lat2), abs=1e-6)


def test_lonlat_crop_metadata_sidecar_date_caption_and_stretch(geotiffs):
    _, ex = _crop(geotiffs, GEO["name"])
    span = 32 * GEO["pixel"]
    lon, lat = GEO["west"] + span / 2, GEO["north"] - span / 2
    assert ex.metadata.lon_deg == pytest.approx(lon, abs=1e-7)
    assert ex.metadata.lat_deg == pytest.approx(lat, abs=1e-7)
    expected = _gsd(GEO["west"], GEO["west"] + span, lat, lon, GEO["north"] - span, GEO["north"], 32)
    assert ex.metadata.gsd_m == pytest.approx(expected, rel=1e-4)
    assert ex.metadata.date == GEO["date"]
    assert ex.caption.full() == GEO["caption"]
    # uint16: the file's 2-98 percentile stretch spans (almost) the whole 0..1 range
    assert 0.0 <= ex.image.min() < 0.05 and 0.95 < ex.image.max() <= 1.0


def test_cloud_cover_from_an_scl_band(geotiffs):
    ds, ex = _crop(geotiffs, QA["name"])
    assert ds.rasters[0].rgb_bands == [1, 2, 3] and ds.rasters[0].qa_band == 4
    assert ex.metadata.cloud_cover == pytest.approx(QA["cloudy_rows"] / QA["size"])
    assert ex.metadata.gsd_m == pytest.approx(QA["pixel"], rel=2e-3)


def test_transform_rescales_gsd_drops_fields_and_maps_pixels(geotiffs):
    _, ex = _crop(geotiffs, UTM["name"])
    out = Transform(resolution=16, metadata_dropout=0.0)(ex, None)
    assert out["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= float(out["pixel_values"].min()) and float(out["pixel_values"].max()) <= 1.0
    # 32 native px fed as 16 px: the GSD as seen by the model doubles (reference §2)
    assert float(out["metadata"][2]) == pytest.approx(ex.metadata.gsd_m * 2 * 1000, rel=1e-6)
    dropped = Transform(resolution=16, metadata_dropout=1.0)(ex, np.random.default_rng(0))
    assert torch.all(dropped["metadata"] == 0)
    kept = Transform(resolution=16, metadata_dropout=0.5)
    zeros = sum(int((kept(ex, np.random.default_rng(i))["metadata"] == 0).sum()) for i in range(200))
    assert 0.4 < zeros / (200 * 7) < 0.6  # each field independently


def test_captions_follow_the_reference_templates():
    cap = fmow_caption("parking_lot_or_garage", "ITA")
    assert cap.full() == "a fmow satellite image of a parking lot or garage in Italy"
    assert fmow_caption(0, "USA").full() == "a fmow satellite image of an airport in United States"
    assert cap.render(np.random.default_rng(0), 1.0) == CORE  # everything droppable dropped, core kept
    texts = {cap.render(np.random.default_rng(i), 0.5) for i in range(64)}
    assert CORE in texts and cap.full() in texts and "a satellite image in Italy" in texts
    assert Caption(text="my caption").render(np.random.default_rng(0), 1.0) == CORE


def test_fmow_metadata_record_percent_cloud_and_timestamp():
    record = {"img_filename": "airport_0_0_rgb.jpg", "gsd": 0.929, "cloud_cover": 7.66,
              "timestamp": "2015-02-27T09:48:22Z", "country_code": "IND", "lon": 76.57, "lat": 28.70}
    meta = metadata_from_record(record)
    assert meta.cloud_cover == pytest.approx(0.0766)
    assert meta.normalised() == pytest.approx([712.694, 659.444, 929.0, 76.6, 291.667, 166.667, 870.968], abs=1e-2)
    # an unusable field becomes unknown instead of failing the sample
    assert metadata_from_record({"gsd": -3, "cloud_cover": "?"}).gsd_m is None


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_fmow_layout_shards_parse(tmp_path):
    image = (np.arange(48 * 40 * 3) % 256).astype(np.uint8).reshape(48, 40, 3)
    record = {"img_filename": "stadium_12_3_rgb.jpg", "gsd": 0.5, "cloud_cover": 20, "timestamp": "2017-05-04T10:00:00Z",
              "country_code": "FRA", "centroid": "POINT (2.35 48.85)"}
    _tar(tmp_path / "000.tar", [("a0", {"input.npy": _npy(image), "metadata.json": json.dumps(record).encode(),
                                        "output.cls": b"51"})])
    source = open_source([str(tmp_path / "{000..000}.tar")], "image")
    handle = next(source.epoch_handles(0, 0, False))
    ex = source.load(handle, np.random.default_rng(0))
    np.testing.assert_array_equal(np.rint(ex.image * 255).astype(np.uint8), image)
    assert ex.metadata.cloud_cover == pytest.approx(0.2)
    assert (ex.metadata.lon_deg, ex.metadata.lat_deg) == (2.35, 48.85)
    assert ex.metadata.date.isoformat() == "2017-05-04"
    assert ex.caption.full() == "a fmow satellite image of a stadium in France"
    out = Transform(resolution=16, metadata_dropout=0.0)(ex, None)
    # 40 px short side fed as 16 px: gsd 0.5 * 40 / 16
    assert float(out["metadata"][2]) == pytest.approx(1250.0)


def test_fmow_csv_centroid(tmp_path):
    csv = tmp_path / "fmow.csv"
    csv.write_text("category,location_id,image_id,polygon\n"
                   'airport,7,2,"POLYGON ((10 20, 12 20, 12 22, 10 22, 10 20))"\n')
    _tar(tmp_path / "s.tar", [("k", {"input.npy": _npy(np.zeros((8, 8, 3), np.uint8)),
                                     "metadata.json": json.dumps({"img_filename": "airport_7_2_rgb.jpg"}).encode()})])
    source = open_source([str(tmp_path / "s.tar")], "image", fmow_csv=str(csv))
    ex = source.load(next(source.epoch_handles(0, 0, False)), np.random.default_rng(0))
    assert (ex.metadata.lon_deg, ex.metadata.lat_deg) == pytest.approx((11.0, 21.0))


def test_temporal_and_superres_layouts(tmp_path):
    frames = {f"input-{i}.npy": _npy(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(2)}
    frames.update({f"metadata-{i}.json": json.dumps({"timestamp": f"201{i}-01-01", "gsd": 1.0}).encode()
                   for i in range(2)})
    ex = parse_temporal_sample({"__key__": "t", **frames}, np.random.default_rng(0), frames=3)
    # fewer than 4 images: padded with the first, which is also the target
    assert len(ex.cond) == 3 and ex.metadata.date.year == 2010
    assert [m.date.year for m in ex.cond_metadata] == [2011, 2010, 2010]
    out = Transform(resolution=16, temporal=True)(ex, None)
    assert out["conditioning"].shape == (3, 3, 16, 16) and out["cond_metadata"].shape == (7, 3)

    ms = np.full((32, 32, 13), 1200, np.uint16)
    sample = {"__key__": "s", "multispectral.npy": _npy(ms), "rgb.npy": _npy(np.zeros((64, 64, 3), np.uint8)),
              "metadata.json": json.dumps({"gsd": 1.0, "timestamp": "2018-01-01"}).encode()}
    ex = parse_superres_sample(sample, np.random.default_rng(0))
    out = Transform(resolution=32, conditioning_resolution=16, metadata_dropout=0.0)(ex, None)
    assert out["conditioning"].shape == (10, 16, 16)
    assert float(out["cond_metadata"][2]) == pytest.approx(10_000.0)  # 10 m, not rescaled (§6)
    assert float(out["metadata"][2]) == pytest.approx(2000.0)  # the 64 px target at 32 px


def test_shard_writer_round_trip_and_braces(tmp_path):
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    arrays = [np.random.default_rng(i).integers(0, 255, (4, 4, 3), dtype=np.uint8) for i in range(5)]
    with ShardWriter(tmp_path, maxcount=2) as writer:
        for i, a in enumerate(arrays):
            writer.write(f"k{i}", {"input.npy": a, "metadata.json": {"i": i}})
    shards = sorted(tmp_path.glob("*.tar"))
    assert len(shards) == 3
    read = [s for shard in shards for s in iter_tar_samples(str(shard))]
    assert [s["__key__"] for s in read] == [f"k{i}" for i in range(5)]
    for sample, a in zip(read, arrays):
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["input.npy"])), a)


def test_prepare_round_trips_through_shards(tmp_path, geotiffs):
    out = tmp_path / "shards"
    assert main(["prepare", "--data", str(geotiffs), "--out", str(out), "--resolution", "16", "--crop-size", "32",
                 "--shard-size", "3", "--json"]) == 0
    folder = GeoTiffFolder(find_geotiffs([geotiffs]), crop_size=32)
    shards = open_source([str(out)], "image")
    transform = Transform(resolution=16, metadata_dropout=0.0)
    direct = [transform(folder.load(i, None), None) for i in range(len(folder))]
    back = [transform(shards.load(h, np.random.default_rng(0)), None) for h in shards.epoch_handles(0, 0, False)]
    assert len(back) == len(direct) == 9
    for a, b in zip(direct, back):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert torch.allclose(a["metadata"], b["metadata"], rtol=1e-6, atol=1e-6)
        assert float((a["pixel_values"] - b["pixel_values"]).abs().max()) <= 1.01 / 255  # 8-bit storage


def _batches(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_at_any_batch(geotiffs):
    source = MapSource(GeoTiffFolder(find_geotiffs([geotiffs]), crop_size=32))
    transform = Transform(resolution=16)
    full = _batches(TrainingStream(source, transform, batch_size=2, seed=3), 8)  # 16 samples: > 1 epoch of 9
    resumed = _batches(TrainingStream(source, transform, batch_size=2, seed=3, start_batch=5), 3)
    for a, b in zip(full[5:], resumed):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert torch.equal(a["metadata"], b["metadata"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    other = _batches(TrainingStream(source, transform, batch_size=2, seed=4), 4)
    assert [b["key"] for b in other] != [b["key"] for b in full[:4]]
    # two processes see disjoint halves of each epoch
    ranks = [_batches(TrainingStream(source, transform, batch_size=1, seed=3, rank=r, world=2), 4) for r in (0, 1)]
    keys = [{k for b in rank for k in b["key"]} for rank in ranks]
    assert not keys[0] & keys[1]


def test_dataloader_workers_keep_the_order(geotiffs):
    source = MapSource(GeoTiffFolder(find_geotiffs([geotiffs]), crop_size=32))
    stream = TrainingStream(source, Transform(resolution=16), batch_size=2, seed=1, start_batch=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    parallel = _batches(loader, 5)
    serial = _batches(stream, 5)
    assert [b["batch_index"] for b in parallel] == [1, 2, 3, 4, 5]
    for a, b in zip(parallel, serial):
        assert a["key"] == b["key"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_data_errors_are_one_line(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        open_source([str(tmp_path / "missing")], "image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="no GeoTIFFs"):
        open_source([str(tmp_path / "empty")], "image")
    with pytest.raises(InvalidRequest, match="reads shards"):
        (tmp_path / "one.tif").write_bytes(b"")
        open_source([str(tmp_path / "one.tif")], "superres")
