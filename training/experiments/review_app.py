"""``simgen-train review``: a local web app over a label output folder (Flask).

A thin HTTP layer over :mod:`training.experiments.review`; the page
(``review_static/index.html``, plain HTML + JavaScript with a canvas, no build step) does the
drawing and calls this JSON API:

============================  ======  ====================================================
path                          method  what
============================  ======  ====================================================
``/api/images``               GET     the images: ``index``, ``name``, ``edits``, ``dirty``
``/api/images/<i>``           GET     one image's state (below)
``/api/images/<i>/pixels``    GET     the image as little-endian float32 bytes, row-major
                                      ``[H, W]`` (``X-Shape: H,W``); 404 when the source
                                      file is gone
``/api/images/<i>/edits``     POST    ``{"action": "change", "column": 12, "class": "vac_X1"}``,
                                      ``{"action": "add", "x": .., "y": .., "class": ..}``
                                      (optional ``"site"``), ``{"action": "delete",
                                      "column": 12}``; answers the new state
``/api/images/<i>/undo``      POST    take back the last edit; answers the new state
``/api/save``                 POST    write every image with unsaved edits (and the
                                      run-level ``summary_corrected.csv``)
============================  ======  ====================================================

The state of an image: ``name``, ``shape`` [H, W], ``pixel_size_A``, ``classes`` (``id``,
``name``, ``colour``, ``sites``, ``defect``), ``allowed`` (site -> class names),
``columns`` (see :meth:`ImageReview.columns`), ``counts`` (the live summary), ``edits``
(the journal), ``dirty``. Bad requests answer 400 with ``{"error": "one line"}``.

The server binds to 127.0.0.1 unless told otherwise: whoever reaches the port can edit the
folder.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import numpy as np

from training.experiments.catalogue import SITE_NAMES
from training.experiments.review import (
    ImageReview,
    ReviewError,
    class_colours,
    find_label_images,
    write_corrected_run_summary,
)

STATIC = Path(__file__).with_name("review_static")


class PortInUse(OSError):
    """The port asked for is taken."""


def open_reviews(root) -> dict[str, ImageReview]:
    """Every labelled image of ``root`` with its journal replayed.

    Raises
    ------
    ReviewError
        ``root`` is not a label output, or a ``corrections.csv`` there does not apply.
    """
    return {name: ImageReview(root, name) for name in find_label_images(root)}


def image_state(rv: ImageReview) -> dict:
    """JSON-ready state of one image (see the module docstring)."""
    names = rv.class_names
    colours = class_colours(names)
    classes = [
        {
            "id": k,
            "name": n,
            "colour": colours[k],
            "sites": [SITE_NAMES[s] for s in rv.allowed.get(n, ())],
            "defect": n in rv.defects,
        }
        for k, n in enumerate(names)
        if k > 0 and not n.startswith("unused_")
    ]
    edits = [e.to_row(rv.name, rv.sha) for e in rv.edits]
    for row in edits:
        row.pop("columns_sha256")
    return {
        "name": rv.name,
        "shape": list(rv.shape),
        "pixel_size_A": rv.pixel_size_A,
        "classes": classes,
        "allowed": {SITE_NAMES[s]: rv.allowed_classes(s) for s in SITE_NAMES},
        "columns": rv.columns(),
        "counts": rv.counts(),
        "edits": edits,
        "dirty": rv.dirty,
        "next_column": rv.next_id(),
    }


def create_app(root, reviews: dict[str, ImageReview] | None = None):
    """The Flask app over the label folder ``root``.

    Parameters
    ----------
    root : path-like
    reviews : dict, optional
        From :func:`open_reviews` (opened here when omitted).
    """
    from flask import Flask, Response, jsonify, request, send_from_directory

    root = Path(root)
    reviews = open_reviews(root) if reviews is None else reviews
    names = list(reviews)
    lock = threading.Lock()
    app = Flask("simgen-review", static_folder=None)
    app.json.sort_keys = False
    app.config["REVIEWS"] = reviews

    def get(i: int) -> ImageReview:
        if not 0 <= i < len(names):
            raise ReviewError(f"image {i}: expected 0..{len(names) - 1}")
        return reviews[names[i]]

    @app.errorhandler(ReviewError)
    def bad_input(err):
        return jsonify(error=" ".join(str(err).split())), 400

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)

    @app.get("/api/images")
    def list_images():
        with lock:
            return jsonify(
                root=str(root),
                images=[
                    {
                        "index": i,
                        "name": n,
                        "edits": len(reviews[n].edits),
                        "dirty": reviews[n].dirty,
                        "n_columns": int(np.sum(reviews[n].alive)),
                    }
                    for i, n in enumerate(names)
                ],
            )

    @app.get("/api/images/<int:i>")
    def show(i):
        with lock:
            return jsonify(image_state(get(i)))

    @app.get("/api/images/<int:i>/pixels")
    def pixels(i):
        rv = get(i)
        try:
            data = rv.read_image()
        except ReviewError as err:
            return jsonify(error=str(err)), 404
        h, w = data.shape
        body = np.ascontiguousarray(data, dtype="<f4").tobytes()
        return Response(body, mimetype="application/octet-stream", headers={"X-Shape": f"{h},{w}"})

    @app.post("/api/images/<int:i>/edits")
    def edit(i):
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ReviewError('edit: expected a JSON object like {"action": "change", ...}')
        action = body.get("action")
        with lock:
            rv = get(i)
            try:
                if action == "change":
                    rv.change(int(body["column"]), str(body["class"]))
                elif action == "delete":
                    rv.delete(int(body["column"]))
                elif action == "add":
                    rv.add(float(body["x"]), float(body["y"]), str(body["class"]), body.get("site"))
                else:
                    raise ReviewError(f"action {action!r}: expected change, add or delete")
            except (KeyError, TypeError) as err:
                raise ReviewError(f"{action} edit: missing or bad field {err}") from None
            return jsonify(image_state(rv))

    @app.post("/api/images/<int:i>/undo")
    def undo(i):
        with lock:
            rv = get(i)
            rv.undo()
            return jsonify(image_state(rv))

    @app.post("/api/save")
    def save():
        with lock:
            written = []
            for rv in reviews.values():
                if rv.dirty:
                    written.extend(str(p.relative_to(root)) for p in rv.save().values())
            if written or not (root / "summary_corrected.csv").exists():
                written.append(str(write_corrected_run_summary(root, reviews).relative_to(root)))
            return jsonify(written=written)

    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8765):
    """A threaded WSGI server (werkzeug) bound to ``host:port`` (``port=0``: any free port).

    The socket is bound here, so a taken port raises instead of werkzeug printing its own
    lines and exiting.

    Raises
    ------
    PortInUse
        When the port is taken.
    """
    import socket

    from werkzeug.serving import ThreadedWSGIServer

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise PortInUse(errno.EADDRINUSE, f"port {port} on {host} is in use") from None
        raise
    try:
        return ThreadedWSGIServer(host, port, app, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate of the socket
