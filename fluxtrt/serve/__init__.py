"""Serving edits: the pipeline loaded and warmed up once, owned by one worker thread, behind an OpenAI-shaped HTTP API
and a web page (``fluxtrt serve``), or fed from a file of edits (``fluxtrt infer --edits``).

The HTTP modules (``app``, ``guard``, ``metrics``, ``server``) need the ``serve`` extra: ``pip install
'fluxtrt[serve]'``; importing this package needs none of it."""

from fluxtrt.serve.options import ServeConfig, ServedSource

__all__ = ["ServedSource", "ServeConfig"]
