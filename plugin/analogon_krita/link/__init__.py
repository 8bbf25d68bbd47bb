"""Talking to the backend: the HTTP and event-stream client on QtNetwork (``client``), image
uploads in one piece or resumable chunks (``uploads``), the one link per Krita that knows where
the backend is and whether it answers (``connection``), starting and stopping a local backend
(``backend_process``) with the options it is started with (``backend_options``), and a backend
on another machine: its address, token and trusted certificate (``remote``, which also holds
the certificate prompt and the settings dialog's Connection tab).
"""
