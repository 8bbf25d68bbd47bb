"""What a changed area looks like back in the document (issue 26), each rule pinned on the
bench's documents (``analogon.bench.resolution``) at a small size, with the model replaced by a
known output: the ideal edit area-averaged to the working grid. An erased object leaves no ghost,
the source's lines vanish where the model drew and stay where it recoloured, the whole change
arrives, every map edge ramps like the map (at least one working pixel where it is hard), the
grey band carries its share of the change and the source's detail, black stays byte-identical,
and the high-resolution pass runs by itself only where it can add detail."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from analogon.bench import resolution as B
from analogon.core import compositing as C
from analogon.core import hires as R

SIZE = (960, 640)
NATIVE = 64  # a working grid of 64×40 cells of 15 px: the toy model's scale


@pytest.fixture(scope="module", params=list(B.SETS))
def case(request):
    sc = B.scene(*SIZE, request.param)
    out = B.standin(sc, NATIVE)
    result = B.return_path(out, sc.doc, sc.map)
    return SimpleNamespace(sc=sc, out=out, result=result, row=B.measure(sc, result, out))


def test_black_stays_byte_identical(case):
    black = case.sc.map == 0
    assert np.array_equal(case.result[black], case.sc.doc[black])


def test_an_erased_object_leaves_no_ghost(case):
    assert case.row["doc_edge"] > 100  # the edge that was there
    assert case.row["ghost"] <= 2.0  # levels


def test_source_lines_vanish_where_the_model_drew_and_stay_where_it_recoloured(case):
    assert case.row["lines_drawn"] <= 0.1
    assert case.row["lines_recoloured"] >= 0.6
    assert case.row["lines_bg"] >= 0.6  # the tinted background keeps its lines too


def test_drawn_edges_are_at_least_as_sharp_as_a_bicubic_stretch(case):
    assert case.row["drawn_edge"] <= case.row["bicubic_edge"]


def test_the_whole_change_arrives(case):
    assert case.row["carried"] >= 0.9


def test_a_change_at_the_working_pixel_scale_arrives_too(case):
    """Difference Inversion's toy output changes pixel by pixel: the carrying-up must not
    average it away (before: about half of it arrived)."""
    sc = case.sc
    rng = np.random.default_rng(1)
    out = B.standin(sc, NATIVE).astype(np.float32)
    out += rng.choice([-40.0, 40.0], size=out.shape[:2])[..., None]  # a change cell by cell
    out = np.clip(out, 0, 255).astype(np.uint8)
    row = B.measure(sc, B.return_path(out, sc.doc, sc.map), out, known=False)
    assert row["carried"] >= 0.9


def test_every_map_edge_ramps_like_the_map(case):
    row = case.row
    s = row["work_px"]
    for edge in ("wg", "gb", "wg_soft", "gb2"):  # white→grey and grey→black, hard and soft
        ramp, own = row[f"{edge}_ramp"], row[f"{edge}_map_ramp"]
        assert s <= ramp <= own + s, edge  # at least one working pixel, within one of the map's
        assert row[f"{edge}_step"] <= 4.0, edge  # levels between neighbouring pixels


def test_the_grey_band_carries_its_share_and_the_source_detail(case):
    assert case.row["grey"] == pytest.approx(1.0, abs=0.1)  # 0.3 of the full change, within 10 %
    assert case.row["grey_detail"] >= 0.85


def test_the_fit_decides_from_itself_which_change_was_drawn():
    sc = B.scene(*SIZE, "bench")
    drawn = C.fit_change(B.standin(sc, NATIVE), sc.doc).new_share()
    recolour = sc.ideal.copy()
    recolour[...] = sc.doc[..., :3][..., [2, 0, 1]]  # the whole picture recoloured, lines and all
    recoloured = C.fit_change(B.standin(SimpleNamespace(doc=sc.doc, ideal=recolour), NATIVE),
                              sc.doc).new_share()
    assert drawn > 0.1 and recoloured < 0.02


# -- hires: auto ----------------------------------------------------------------------------

def test_auto_refines_only_models_large_enough_to_add_detail():
    assert not R.auto(64, 4.0) and not R.auto(128, 4.0)  # the toy models, whatever the document
    assert R.auto(512, 4.9) and not R.auto(512, 1.2)
    auto = R.HiresSettings(mode="auto")
    assert R.refine_size((3000, 2000), (64, 40), 64, auto) is None
    assert R.refine_size((3000, 2000), (128, 80), 128, auto) is None
    assert R.refine_size((3000, 2000), (512, 336), 512, auto) is not None


def _finish(monkeypatch, out, doc, native=512):
    """``core.hires.finish`` for a model of ``native`` px whose result is ``out``; the pass itself
    replaced by a recorder."""
    from analogon.methods.base import Inputs, LayerImage, MethodParams, MethodResult, ResultImage

    calls = []
    monkeypatch.setattr(R, "refine", lambda ctx, out, *a: (calls.append(1), (out, {"tiles": 1}))[1])
    ctx = SimpleNamespace(model=SimpleNamespace(native_size=native, vae_scale_factor=8, info={}))
    method = SimpleNamespace(target_role="b")
    R.finish(ctx, method, Inputs({"b": LayerImage(doc, "b")}), MethodParams(),
             MethodResult([ResultImage(out)]))
    return bool(calls)


def test_auto_refines_only_where_the_model_drew(monkeypatch):
    sc = B.scene(1600, 1000, "bench")
    recolour = SimpleNamespace(doc=sc.doc, ideal=np.ascontiguousarray(sc.doc[..., [2, 0, 1]]))
    assert not _finish(monkeypatch, B.standin(recolour, 512), sc.doc)
    assert _finish(monkeypatch, B.standin(sc, 512), sc.doc)
    assert not _finish(monkeypatch, B.standin(sc, 64), sc.doc, native=64)


def test_the_toy_model_gets_no_high_resolution_pass_by_default(tiny_sd, make_ctx):
    from analogon.methods import get
    from analogon.methods.base import Inputs, LayerImage

    method = get("pixels")
    src = np.zeros((256, 256, 4), np.uint8)
    src[..., :3], src[..., 3] = 120, 255
    src[100:160, 80:200, :3] = (200, 60, 40)
    res = method.run(make_ctx(tiny_sd), Inputs({"source": LayerImage(src, "s")}),
                     method.Params(steps=2, strength=0.75))
    assert "hires" not in res.info["return"]
