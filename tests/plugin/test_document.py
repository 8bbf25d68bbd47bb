"""The Krita adapter on the fake Krita: byte orders, 16-bit conversion, refusals, region of
interest, feathered compositing, result and edit-map layers."""
from __future__ import annotations

import pytest
from fake_krita import Selection

from analogon_krita.document import document as kd
from analogon_krita.document import imaging
from analogon_krita.document.document import AdapterError, Rect


def new_doc(kapp, w=32, h=24, model="RGBA", depth="U8"):
    doc = kapp.createDocument(w, h, "t", model, depth, "", 72.0)
    kapp.setActiveDocument(doc)
    return doc


def add_layer(doc, name, bgra_pixel=None, rect=None, above=None):
    node = doc.createNode(name, "paintlayer")
    doc.rootNode().addChildNode(node, above)
    if bgra_pixel is not None:
        r = rect or Rect(0, 0, doc.width(), doc.height())
        node.setPixelData(bytes(bgra_pixel) * (r.w * r.h), r.x, r.y, r.w, r.h)
    node.writes = 0
    return node


def test_bgra_becomes_rgba(kapp):
    doc = new_doc(kapp)
    node = add_layer(doc, "L", (10, 20, 30, 255))  # B, G, R, A as Krita stores them
    rgba = kd.read_layer(node, Rect(0, 0, 2, 1))
    assert rgba == bytes([30, 20, 10, 255]) * 2


def test_sixteen_bit_is_converted_both_ways(kapp):
    doc = new_doc(kapp, 8, 8, depth="U16")
    px = b"".join(int(v * 257).to_bytes(2, "little") for v in (10, 20, 30, 255))  # BGRA u16
    src = add_layer(doc, "src", px)
    assert kd.read_layer(src, Rect(0, 0, 1, 1)) == bytes([30, 20, 10, 255])
    node = kd.insert_result(doc, src, bytes([1, 2, 3, 255]) * 64, 8, 8, Rect(0, 0, 8, 8), "r")
    raw = node.pixelData(0, 0, 1, 1)
    assert [int.from_bytes(raw[i:i + 2], "little") for i in range(0, 8, 2)] == [3 * 257, 2 * 257, 1 * 257, 65535]


def test_u16_reads_are_rounded_not_truncated():
    vals = list(range(0, 65536, 7))
    vals += [0] * (-len(vals) % 4)
    data = b"".join(v.to_bytes(2, "little") for v in vals)
    out = imaging.krita_to_rgba8(data, len(vals) // 4, 1, "U16")
    # BGRA in, RGBA out: swap back to compare channel by channel
    bgra = imaging.rgba8_to_krita(out, len(vals) // 4, 1, "U8")
    assert list(bgra) == [round(v / 257) for v in vals]
    assert imaging.krita_to_rgba8(bytes([1, 0x12, 0xff, 0x12, 0, 0, 0xff, 0xff]), 1, 1, "U16")[:2] == bytes([0, 19])
    every = bytes(range(256))
    assert imaging.krita_to_rgba8(imaging.rgba8_to_krita(every, 64, 1, "U16"), 64, 1, "U16") == every


def test_masks_and_alpha_with_qt_image_operations():
    assert imaging.multiply_alpha(bytes([1, 2, 3, 255, 4, 5, 6, 255]), bytes([0, 128]), 2, 1)[3::4] == bytes([0, 128])
    assert imaging.multiply_alpha(bytes([10, 20, 30, 128]), bytes([128]), 1, 1) == bytes([10, 20, 30, 64])
    assert imaging.mask_to_rgba(bytes([7, 0, 255]), 3, 1) == bytes([7, 7, 7, 255, 0, 0, 0, 255, 255, 255, 255, 255])
    assert imaging.multiply_masks(bytes([255, 128, 0, 255]), bytes([255, 255, 255, 64]), 4, 1) == bytes([255, 128, 0, 64])


def test_composite_keeps_the_base_exact_where_overlays_are_transparent():
    # every colour at every alpha from 2 up: drawn under a transparent overlay, nothing moves
    base = b"".join(bytes([c, 255 - c, (c * 7) % 256, a]) for a in range(2, 256) for c in range(256))
    w, h = 256, 254
    clear = bytes(w * h * 4)
    assert imaging.composite(base, w, h, [(clear, 1.0)]) == base
    red = bytes([255, 0, 0, 255]) * (w * h)
    over = imaging.composite(base, w, h, [(red, 0.5)])
    assert over[4 * 300:4 * 301] != base[4 * 300:4 * 301] and over[3::4] != base[3::4]


@pytest.mark.parametrize("model,depth,words", [
    ("CMYKA", "U8", "CMYK"), ("LABA", "U16", "L*a*b*"), ("GRAYA", "U8", "grey-scale"),
    ("RGBA", "F32", "floating-point"), ("RGBA", "F16", "floating-point"),
])
def test_unsupported_documents_are_refused_clearly(kapp, model, depth, words):
    doc = new_doc(kapp, 4, 4, model, depth)
    with pytest.raises(AdapterError) as e:
        kd.check_document(doc)
    assert words in e.value.message and "Convert Image Color Space" in e.value.message


def test_a_cmyk_layer_in_an_rgb_document_is_told_to_convert_the_layer(kapp):
    doc = new_doc(kapp, 4, 4)
    layer = add_layer(doc, "Print proof", (1, 1, 1, 255))
    layer._model = "CMYKA"  # a CMYK layer pasted into an RGB document (the fake converts none)
    with pytest.raises(AdapterError) as e:
        kd.read_layer(layer, kd.Rect(0, 0, 4, 4), "Source")
    msg = e.value.message
    assert "\u201cPrint proof\u201d (Source) is in CMYK colour" in msg
    assert "Layer \u25b8 Convert \u25b8 Convert Layer Color Space" in msg and "Image \u25b8" not in msg


def test_hidden_and_empty_layers_are_refused(kapp):
    doc = new_doc(kapp)
    hidden = add_layer(doc, "Hidden one", (1, 1, 1, 255))
    hidden.setVisible(False)
    empty = add_layer(doc, "Blank")
    role = {"name": "a", "title": "A"}
    full = kd.document_rect(doc)
    with pytest.raises(AdapterError, match="\u201cHidden one\u201d chosen for A is hidden"):
        kd.role_image(doc, hidden, role, full, False)
    with pytest.raises(AdapterError, match="\u201cBlank\u201d chosen for A is empty"):
        kd.role_image(doc, empty, role, full, False)
    # content outside the region of interest is empty for a placed role
    corner = add_layer(doc, "Corner", (5, 5, 5, 255), Rect(0, 0, 4, 4))
    with pytest.raises(AdapterError, match="empty inside the selected region"):
        kd.role_image(doc, corner, {"name": "exemplar", "title": "Exemplars", "multiple": True},
                      Rect(16, 8, 8, 8), False)


def test_placed_and_whole_roles(kapp):
    doc = new_doc(kapp)
    ex = add_layer(doc, "ex", (0, 0, 255, 255), Rect(10, 6, 5, 4))
    roi = Rect(8, 4, 16, 16)
    placed = kd.role_image(doc, ex, {"name": "exemplar", "multiple": True}, roi, False)
    assert (placed.x, placed.y, placed.width, placed.height) == (2, 2, 5, 4)
    whole = kd.role_image(doc, ex, {"name": "a"}, roi, False)
    assert (whole.x, whole.width, whole.height) == (None, 5, 4)
    target = kd.role_image(doc, ex, {"name": "source"}, roi, True)
    assert (target.width, target.height, target.x) == (16, 16, None)


def test_region_of_interest(kapp):
    doc = new_doc(kapp, 100, 80)
    assert kd.region_of_interest(doc) == (Rect(0, 0, 100, 80), False)
    sel = Selection()
    sel.select(40, 30, 10, 10, 255)
    doc.setSelection(sel)
    roi, from_sel = kd.region_of_interest(doc, padding=5)
    assert from_sel and roi.x <= 35 and roi.y <= 25 and roi.x + roi.w >= 55 and roi.y + roi.h >= 45
    assert roi.w % 8 == 0 and roi.h % 8 == 0
    # near the edge: clipped to the canvas
    sel2 = Selection()
    sel2.select(95, 0, 5, 5, 255)
    doc.setSelection(sel2)
    roi, _ = kd.region_of_interest(doc, padding=10)
    assert roi.x + roi.w <= 100 and roi.y >= 0 and roi.w % 8 == 0


def test_result_layer_above_target_at_offset_with_feathered_mask(kapp):
    doc = new_doc(kapp, 40, 40)
    bg = add_layer(doc, "Background", (255, 255, 255, 255))
    target = add_layer(doc, "Photo", (0, 128, 0, 255), above=bg)
    top = add_layer(doc, "Top", (0, 0, 0, 0), above=target)
    before = {n.name(): n.pixelData(0, 0, 40, 40) for n in (bg, target, top)}
    sel = Selection()
    sel.select(10, 10, 20, 20, 255)
    doc.setSelection(sel)
    roi, _ = kd.region_of_interest(doc, padding=4, align=1)
    assert roi == Rect(6, 6, 28, 28)
    mask = kd.feathered_mask(doc, roi, 3)
    assert len(mask) == roi.w * roi.h
    at = lambda x, y: mask[(y - roi.y) * roi.w + (x - roi.x)]  # noqa: E731
    assert at(20, 20) == 255 and at(7, 7) == 0 and 0 < at(10, 20) < 255
    result = bytes([200, 0, 0, 255]) * (roi.w * roi.h)
    node = kd.insert_result(doc, target, result, roi.w, roi.h, roi, "pixels seed 7", mask)
    names = [n.name() for n in doc.rootNode().childNodes()]
    assert names == ["Background", "Photo", "pixels seed 7", "Top"]
    px = node.pixelData(20, 20, 1, 1)
    assert px == bytes([0, 0, 200, 255])  # BGRA
    assert node.pixelData(5, 5, 1, 1)[3] == 0 and node.pixelData(8, 8, 1, 1)[3] == 0
    assert 0 < node.pixelData(10, 20, 1, 1)[3] < 255
    assert node.bounds().x() >= 10 and node.bounds().right() <= 29
    for n in (bg, target, top):
        assert n.pixelData(0, 0, 40, 40) == before[n.name()] and n.writes == 0
    node.remove()
    assert [n.name() for n in doc.rootNode().childNodes()] == ["Background", "Photo", "Top"]


def test_result_of_another_size_is_scaled_to_the_region(kapp):
    doc = new_doc(kapp, 16, 16)
    t = add_layer(doc, "t", (1, 2, 3, 255))
    node = kd.insert_result(doc, t, bytes([9, 9, 9, 255]) * 64, 8, 8, Rect(0, 0, 16, 16), "r")
    assert node.pixelData(15, 15, 1, 1) == bytes([9, 9, 9, 255])


def test_show_variant_adds_a_copy_layer_that_alone_shows(kapp):
    doc = new_doc(kapp, 16, 16, depth="U16")
    t = add_layer(doc, "t", (0, 0, 0, 0, 0, 0, 255, 255))
    roi = Rect(4, 4, 8, 8)
    mask = bytes([255] * 32 + [0] * 32)  # top half of the region only
    group = kd.insert_result(doc, t, bytes([10, 20, 30, 255]) * 64, 8, 8, roi, "r 1", mask, variants=True)
    assert group.type() == "grouplayer" and [n.name() for n in group.childNodes()] == ["r 1"]
    kd.show_variant(doc, group, bytes([40, 50, 60, 255]) * 16, 4, 4, roi, "r 2", mask)
    expected = kd.insert_result(doc, t, bytes([40, 50, 60, 255]) * 64, 8, 8, roi, "e", mask)
    assert group.name() == "r 2" and group.projectionPixelData(0, 0, 16, 16) == expected.pixelData(0, 0, 16, 16)
    assert [n.blendingMode() for n in group.childNodes()] == ["normal", "copy"]
    assert t.writes == 0 and group.childNodes()[0].writes == 1  # filled once, before it was added
    with pytest.raises(AdapterError):
        kd.show_variant(doc, t, bytes([1, 2, 3, 255]) * 64, 8, 8, roi, "x")


def test_each_variant_shown_after_the_first_is_one_undo_step(kapp):
    """Krita records a blending change as a step of its own: the first variant shown pays
    it, later ones copy that layer (no step) and still replace the whole region."""
    doc = new_doc(kapp, 16, 16)
    t = add_layer(doc, "t", (0, 0, 0, 255))
    roi = Rect(4, 4, 8, 8)
    group = kd.insert_result(doc, t, bytes([10, 20, 30, 255]) * 64, 8, 8, roi, "r 1", variants=True)
    doc.undo_log.clear()
    kd.show_variant(doc, group, bytes([40, 50, 60, 255]) * 64, 8, 8, roi, "r 2")
    assert doc.undo_log == [("blending", "r 2"), ("add", "r 2")]
    second = group.childNodes()[-1]
    second.setPixelData(bytes([1, 1, 1, 255]), 0, 0, 1, 1)  # the painter drew outside the region
    doc.undo_log.clear()
    half = bytes([70, 80, 90, 255]) * 32 + bytes(4 * 32)  # its lower half transparent
    kd.show_variant(doc, group, half, 8, 8, roi, "r 3")
    assert doc.undo_log == [("add", "r 3")]
    third = group.childNodes()[-1]
    assert [n.name() for n in group.childNodes()] == ["r 1", "r 2", "r 3"] and group.name() == "r 3"
    assert (third.blendingMode(), third.opacity(), third.visible(), third.locked()) == ("copy", 255, True, False)
    assert third.uniqueId() != second.uniqueId() and second.pixelData(0, 0, 1, 1) == bytes([1, 1, 1, 255])
    expected = kd.insert_result(doc, t, half, 8, 8, roi, "e")
    assert group.projectionPixelData(0, 0, 16, 16) == expected.pixelData(0, 0, 16, 16)
    third.remove()
    second.addChildNode(doc.createNode("mask", "transparencymask"), None)
    doc.undo_log.clear()  # a layer unlike a fresh one (here: a mask on it) is not copied
    kd.show_variant(doc, group, half, 8, 8, roi, "r 4")
    assert doc.undo_log == [("blending", "r 4"), ("add", "r 4")]


def test_results_go_above_every_layer_the_pass_used_with_unique_names(kapp):
    doc = new_doc(kapp, 8, 8)
    group = doc.createNode("group", "grouplayer")
    src = add_layer(doc, "src", (1, 2, 3, 255))
    doc.rootNode().addChildNode(group, src)
    inner = doc.createNode("exemplar", "paintlayer")
    group.addChildNode(inner, None)
    top = add_layer(doc, "unused", (9, 9, 9, 255), above=group)
    clear = bytes(8 * 8 * 4)
    r1 = kd.insert_result(doc, src, clear, 8, 8, Rect(0, 0, 8, 8), "pixels seed 7", used=[inner])
    r2 = kd.insert_result(doc, src, clear, 8, 8, Rect(0, 0, 8, 8), "pixels seed 7", used=[inner, r1])
    assert [n.name() for n in doc.rootNode().childNodes()] == [
        "src", "group", "pixels seed 7", "pixels seed 7 #2", "unused"]
    assert r2.name() == "pixels seed 7 #2" and top.writes == 0


def test_the_composite_is_unchanged_where_the_result_layer_is_transparent(kapp):
    """A semi-transparent source at 50 % opacity in a 16-bit document: the result layer
    takes the source's opacity and the composite moves only where the layer has content."""
    doc = new_doc(kapp, 8, 8, depth="U16")
    bg = add_layer(doc, "bg", (0x1234).to_bytes(2, "little") * 3 + b"\xff\xff")
    src = add_layer(doc, "src", b"".join(v.to_bytes(2, "little") for v in (40000, 1234, 777, 30000)), above=bg)
    src.setOpacity(128)
    before = doc.pixelData(0, 0, 8, 8)
    layer_rgba = bytearray(8 * 8 * 4)
    layer_rgba[0:4] = bytes([255, 0, 0, 255])  # one changed pixel, the rest transparent
    node = kd.insert_result(doc, src, bytes(layer_rgba), 8, 8, Rect(0, 0, 8, 8), "r")
    assert node.opacity() == 128
    after = doc.pixelData(0, 0, 8, 8)
    assert after[8:] == before[8:] and after[:8] != before[:8]


def test_exemplars_are_read_at_their_layer_opacity(kapp):
    doc = new_doc(kapp, 4, 4)
    ex = add_layer(doc, "ex", (0, 0, 255, 255))
    ex.setOpacity(128)
    role = {"name": "exemplar", "kind": "image", "multiple": True}
    ri = kd.role_image(doc, ex, role, Rect(0, 0, 4, 4), False)
    assert len(set(ri.rgba[3::4])) == 1 and abs(ri.rgba[3] - 128) <= 1 and ri.rgba[:3] == bytes([255, 0, 0])


def test_hidden_maps_are_read_hidden_images_refused(kapp):
    doc = new_doc(kapp, 4, 4)
    t = add_layer(doc, "photo", (1, 2, 3, 255))
    m = kd.create_edit_map(doc, t)
    m.setVisible(False)
    ri = kd.role_image(doc, m, {"name": "edit_map", "kind": "map"}, Rect(0, 0, 4, 4), False)
    assert ri.rgba == bytes([0, 0, 0, 255]) * 16
    t.setVisible(False)
    with pytest.raises(AdapterError, match="hidden"):
        kd.role_image(doc, t, {"name": "a", "kind": "image"}, Rect(0, 0, 4, 4), False)


def test_edit_map_layer(kapp):
    doc = new_doc(kapp, 8, 8)
    t = add_layer(doc, "photo", (1, 2, 3, 255))
    m = kd.create_edit_map(doc, t)
    assert [n.name() for n in doc.rootNode().childNodes()] == ["photo", "Edit map"]
    assert m.colorModel() == "GRAYA" and m.opacity() == kd.EDIT_MAP_OPACITY
    assert kd.is_edit_map(m)
    rgba = kd.read_layer(m, Rect(0, 0, 8, 8))
    assert rgba == bytes([0, 0, 0, 255]) * 64
    assert t.writes == 0
