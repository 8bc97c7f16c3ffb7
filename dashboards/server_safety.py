"""Request guards of the dashboard's Flask server: path traversal and unknown files get a plain 404.

Dash's own allow-list already refuses files outside its registered component suites, but as an
unhandled exception (a 500 with a logged traceback), and its catch-all page route answers `/../x`
with the app's index. Here any request whose path has a `..` segment, a backslash or a
percent-encoded dot, slash or backslash is refused before routing, and a suite file Dash does not
know is a 404 too, so the server answers with the app and the files it registered, nothing else.
"""

from __future__ import annotations

import re

from dash.exceptions import DependencyException
from flask import Flask, Response, request

_ENCODED = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)  # ".", "/", "\" hidden from a path check


def is_traversal(raw_path: str, decoded_path: str) -> bool:
    """True for a path that climbs (a `..` segment) or hides separators and dots (percent-encoded, or `\\`)."""
    for path in (raw_path, decoded_path):
        if "\\" in path or _ENCODED.search(path) or ".." in path.split("/"):
            return True
    return False


def _not_found() -> Response:
    return Response("not found\n", status=404, mimetype="text/plain")


def guard(server: Flask) -> None:
    """Install the guards on a Dash app's Flask server (`app.server`)."""

    @server.before_request
    def _refuse_traversal() -> Response | None:
        raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
        if is_traversal(raw.split("?", 1)[0], request.path):
            return _not_found()
        return None

    @server.errorhandler(DependencyException)
    def _unknown_suite_file(_err: DependencyException) -> Response:
        return _not_found()


__all__ = ["guard", "is_traversal"]
