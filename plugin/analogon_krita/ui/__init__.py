"""The docker's widgets and dialogs, and what they say: the panel bound to the controller
(``panel``), the widgets it is built from (``widgets``), parameter forms from the methods'
schemas (``forms``, without widgets), the model choice (``models_ui``), the connection area's
sentence and button (``lead``, no Qt) and the settings dialog with its install pane
(``backend_setup``). Nothing here does the work: it shows the controller's state and calls it,
the link (``link``) and the installer (``install``).
"""
