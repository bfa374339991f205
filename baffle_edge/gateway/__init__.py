"""The device gateway: the reference server's rounds over HTTP(S) for real devices.

``serve.serve`` runs ``simulate.train`` with a ``board.Board`` as the ``gather`` hook and a
FastAPI app (``app.create_app``) in front of it; ``tokens`` holds the hashed device tokens;
``device`` is the Python device client. docs/gateway.md: API and threat model.
"""
