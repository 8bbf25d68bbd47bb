"""Getting a backend onto the machine: ``installer`` fetches a pinned ``uv``, makes a virtual
environment in the user's data folder and installs the backend wheel that came in the release
zip with the PyTorch build for the machine; update, uninstall, and the sweep of half-removed
folders. Its window is the settings dialog's install pane (``ui.backend_setup``); the link
(``link.backend_process``) starts what it installed.
"""
