"""The web operator console (``python -m runtime.web``) and the live Foxglove stream of an agent.

Why a separate process: the agent's serving thread must not pay for HTTP, WebSockets, thumbnails
or Foxglove. This process is a console client of the agent like ``runtime.console`` (its own
CurveZMQ key on the control socket), a subscriber of its predictions and of the camera stream,
and an HTTP server for the page. See ``runtime.web.server`` for the process, ``runtime.web.feed``
for the ZeroMQ side, ``runtime.web.app`` for the HTTP routes and ``runtime.web.tokens`` for the
access tokens.
"""
