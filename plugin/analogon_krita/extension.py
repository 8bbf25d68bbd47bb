"""Registration inside Krita: the docker factory and the extension with the actions."""
from __future__ import annotations

DOCKER_ID = "analogon_docker"


def register():
    import krita

    from .controller import Controller
    from .ui.panel import make_docker_class
    from .qt import scoped_enum

    app = krita.Krita.instance()
    right = scoped_enum(krita.DockWidgetFactoryBase, "DockPosition", "DockRight")
    app.addDockWidgetFactory(krita.DockWidgetFactory(DOCKER_ID, right, make_docker_class()))
    app.addExtension(AnalogonExtension(app))
    try:
        app.notifier().applicationClosing.connect(lambda: Controller.instance().shutdown())
    except Exception:  # an older host without the notifier signal: atexit still stops it
        pass


def _extension_base():
    import krita

    return krita.Extension


class AnalogonExtension(_extension_base()):
    """Menu actions (Tools ▸ Scripts): generate, cancel, new edit map, start backend."""

    ACTIONS = (
        ("analogon_generate", "Analogon: Generate", "generate"),
        ("analogon_cancel", "Analogon: Cancel", "cancel"),
        ("analogon_new_edit_map", "Analogon: New edit map", "new_edit_map"),
        ("analogon_start_backend", "Analogon: Start backend", "start_backend"),
    )

    def setup(self):
        pass

    def createActions(self, window):
        from .controller import Controller

        for action_id, text, method in self.ACTIONS:
            action = window.createAction(action_id, text, "tools/scripts")
            action.triggered.connect(lambda _=False, m=method: getattr(Controller.instance(), m)())
