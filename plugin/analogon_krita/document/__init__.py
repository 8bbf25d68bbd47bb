"""Reading and writing the Krita document: layers and the selection in, results out as new
layers (``document``, the only module that touches Krita's Document/Node API directly; its
pixel conversions with Qt's image operations are ``imaging``), which layer plays which role by
default (``roles``), the running pass's preview layer on the canvas (``canvas_preview``), the
edit maps a pass hid (``map_visibility``), which variant a result group shows (``variants``),
and the history and chosen layers kept in the document itself (``session``). No widgets here.
"""
