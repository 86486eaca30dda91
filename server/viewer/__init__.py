"""The selection viewer's files (served by server/routes/viewer.py), and the paths they answer on."""

ASSETS = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
VIEWER_PATHS = frozenset({"/viewer", *(f"/viewer/{name}" for name in ASSETS)})
