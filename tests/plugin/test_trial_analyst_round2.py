"""What the GIS analyst's second trial in the real QGIS GUI found (spread legend, dates, ...)."""

from __future__ import annotations

import array

from osgeo import gdal
from qgis.core import QgsColorRampLegendNode, QgsLayerTreeLayer, QgsRasterLayer

from qgis_plugin.layers import style_spread

from .helpers import ORIGIN, _srs


def _spread_tif(path, size: int = 32):
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 1, gdal.GDT_Float32)
    ds.SetGeoTransform((ORIGIN[0], 10.0, 0, ORIGIN[1], 0, -10.0))
    ds.SetProjection(_srs(32633))
    values = array.array("f", [((x * 7 + y * 3) % 50) / 250.0 for y in range(size) for x in range(size)])
    ds.GetRasterBand(1).WriteRaster(0, 0, size, size, values.tobytes())
    ds.GetRasterBand(1).SetDescription("spread")
    ds = None
    return path


def test_the_spread_legend_says_what_its_ends_mean(tmp_path):
    """QGIS draws the interpolated ramp's legend as one bar labelled with the raw min and max
    ("0" and "0.172415" in the GUI): the ends must carry the words the stops have."""
    layer = QgsRasterLayer(str(_spread_tif(tmp_path / "s.spread.tif")), "spread")
    assert layer.isValid()
    stops = style_spread(layer)
    nodes = layer.legend().createLayerTreeModelLegendNodes(QgsLayerTreeLayer(layer))
    ramps = [n for n in nodes if isinstance(n, QgsColorRampLegendNode)]
    assert ramps, "the spread legend is a continuous ramp"
    settings = ramps[0].settings()
    assert settings.minimumLabel() == stops[0][1] and "the seeds agree" in settings.minimumLabel()
    assert settings.maximumLabel() == stops[-1][1] and "guessing" in settings.maximumLabel()


def test_the_conditional_tabs_date_override_starts_inside_the_training_years(plugin):
    """The Generate tab starts on today's day in 2024; the in-paint / super-res / temporal
    Advanced → Date ("set") started on today (2026 here), so ticking "set" asked about the
    training range on the first run."""
    from qgis_plugin.checks import YEAR_RANGE
    from qgis_plugin.requests import default_date

    expected = default_date(plugin.dock.canvas())
    assert YEAR_RANGE[0] <= expected.year <= YEAR_RANGE[1]
    seen = 0
    for tab in (plugin.dock.inpaint, plugin.dock.superres, getattr(plugin.dock, "temporal", None)):
        edit = getattr(tab, "adv_date", None)
        if edit is None:
            continue
        seen += 1
        d = edit.date()
        assert (d.year(), d.month(), d.day()) == (expected.year, expected.month, expected.day), tab.task
        tab.date_set.setChecked(True)
        assert not [w for w in tab.range_warnings() if "date" in w.problem.lower()], tab.task
    assert seen >= 2


def test_the_dock_switches_back_from_its_own_ground_resolution_for_a_small_extent(plugin):
    """After a 60 km extent the dock chose Ground resolution (20 m/px) by itself; a 900 m extent
    drawn next was then a 48 x 48 px image at 20 m/px (seen in the GUI). When the mode was the
    dock's choice, an extent that fits one image goes back to Longest side; the user's own choice
    of Ground resolution is kept."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    tab = plugin.dock.generate
    tab.size_mode.setCurrentIndex(0)
    tab.size.setValue(512)
    tab.set_extent(QgsRectangle(250000, 4600000, 310000, 4640000), utm)
    assert tab.by_ground_resolution and tab.gsd.value() == 20.0
    small = QgsRectangle(296000, 4641000, 296880, 4641880)
    tab.set_extent(small, utm)
    assert not tab.by_ground_resolution
    assert max(tab.target_size()) == 512
    # a large extent again, then the user picks the resolution: the dock keeps it
    tab.set_extent(QgsRectangle(250000, 4600000, 310000, 4640000), utm)
    assert tab.by_ground_resolution
    tab.gsd.setValue(8.0)
    tab.set_extent(small, utm)
    assert tab.by_ground_resolution and tab.gsd.value() == 8.0
    assert tab.target_size() == (112, 112)
    # chosen by the user from the start: kept as well
    tab.size_mode.setCurrentIndex(0)
    tab.size_mode.setCurrentIndex(1)
    tab.gsd.setValue(10.0)
    tab.set_extent(small, utm)
    assert tab.by_ground_resolution and tab.gsd.value() == 10.0
    tab.size_mode.setCurrentIndex(0)


def test_the_plan_line_names_the_windows_of_a_ground_resolution_job(engine_env):
    """The dock's plan read "4 tiles" for generate at 8 m/px over 3 km; the engine's plan says
    those are 4 windows denoised together (docs/plugin.md: "the plan ... shows the windows")."""
    from qgis_plugin.engine_client import EngineClient
    from qgis_plugin.preflight import evaluate

    client = EngineClient(engine_env.url, engine_env.token)
    request = {"task": "generate", "bbox": [296000, 4641000, 299000, 4644000], "crs": "EPSG:32633",
               "gsd": 8.0, "model": "tiny", "steps": 1}
    plan = client.plan(request)
    check = evaluate(client, request, plan, engine=engine_env.url, max_megapixels=100, max_minutes=120)
    text = check.summary()
    assert f"{plan['windows']} windows denoised together" in text and "tiles" not in text, text
    one = {**request, "gsd": None, "size": 64}
    one.pop("gsd")
    text = evaluate(client, one, client.plan(one), engine=engine_env.url, max_megapixels=100,
                    max_minutes=120).summary()
    assert "1 tile ·" in text and "window" not in text, text


def test_the_progress_of_a_ground_resolution_job_counts_windows_and_steps(engine_env, tmp_path):
    """1 denoising step over 2 x 2 windows showed "step 4/4" in the dock and its task: the engine
    counts window steps for its meter. The plugin shows "window k/4 · step 1/1"."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    from qgis_plugin.engine_client import EngineClient
    from qgis_plugin.prepare import prepare_generate
    from qgis_plugin.tasks import run_job

    client = EngineClient(engine_env.url, engine_env.token)
    prepared = prepare_generate(QgsRectangle(296000, 4641000, 299000, 4644000),
                                QgsCoordinateReferenceSystem("EPSG:32633"), gsd=8.0, steps=1, seed=1,
                                model="tiny", output_path=str(tmp_path / "g.tif"))
    seen: list[str] = []
    plans: list = []
    outcome = run_job(client, prepared, progress=lambda frac, text: seen.append(text),
                      on_plan=lambda request, plan: plans.append(plan), poll_s=0.05)
    assert plans and plans[0]["joint_denoising"] and plans[0]["windows"] == 4
    assert outcome.path and (tmp_path / "g.tif").exists()
    denoising = [t for t in seen if t.startswith("window")]
    assert denoising, seen
    assert all(" · step 1/1" in t for t in denoising), seen
    assert not [t for t in seen if t.startswith("step ") and "/4" in t], seen


def test_an_extent_too_large_even_at_20_m_per_px_keeps_longest_side(plugin):
    """A 4,670 km extent at 20 m/px would be ~23 Gpx, far over Engine settings' output limit: the
    dock keeps Longest side, whose GSD warning says to draw a smaller extent (test_usability)."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    tab = plugin.dock.generate
    tab.size_mode.setCurrentIndex(0)
    tab.set_extent(QgsRectangle(-2_335_000, 4_000_000, 2_335_000, 6_000_000), QgsCoordinateReferenceSystem("EPSG:3857"))
    assert not tab.by_ground_resolution
    tab.set_extent(QgsRectangle(250000, 4600000, 310000, 4640000), QgsCoordinateReferenceSystem("EPSG:32633"))
    assert tab.by_ground_resolution  # 60 km: 6 Mpx at 20 m/px, within the limit
    tab.set_extent(QgsRectangle(-2_335_000, 4_000_000, 2_335_000, 6_000_000), QgsCoordinateReferenceSystem("EPSG:3857"))
    assert not tab.by_ground_resolution  # the dock's own choice is undone
