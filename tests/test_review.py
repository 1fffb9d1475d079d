"""The review app's HTTP API (``simgen-train review``), without a browser.

A label output folder is written without a network (``_labelfolder``); the Flask test client
drives the API as the page does: change classes, add and delete columns, undo, save, reopen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import socket

import numpy as np
import pytest
from _labelfolder import write_label_folder
from typer.testing import CliRunner

from training.experiments.catalogue import read_columns_csv, summarize
from training.experiments.review import (
    COLUMNS_CORRECTED,
    CORRECTIONS,
    SUMMARY_CORRECTED,
    ImageReview,
    ReviewError,
)
from training.experiments.review_app import create_app

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "labelled"
    write_label_folder(root, n_images=2)
    return root


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _client(root):
    return create_app(root).test_client()


def _columns(state, **where):
    return [c for c in state["columns"] if all(c[k] == v for k, v in where.items())]


def _count(state, name):
    return state["counts"]["classes"][name]["count"]


def test_state_and_pixels_match_the_files(folder):
    c = _client(folder)
    images = c.get("/api/images").get_json()["images"]
    assert [im["name"] for im in images] == ["img0", "img1"]
    st = c.get("/api/images/0").get_json()
    cat = read_columns_csv(folder / "img0" / "columns.csv")
    assert len(st["columns"]) == len(cat)
    assert (
        st["counts"]["defects"]["count"]
        == json.loads((folder / "img0" / "summary.json").read_text())["defects"]["count"]
    )
    assert st["allowed"]["metal"] == ["metal", "vac_M", "antisite_X1", "antisite_X2", "dopant_M"]
    assert "metal" not in st["allowed"]["chalcogen"]
    r = c.get("/api/images/1/pixels")
    h, w = (int(v) for v in r.headers["X-Shape"].split(","))
    pixels = np.frombuffer(r.data, dtype="<f4").reshape(h, w)
    source = json.loads((folder / "img1" / "summary.json").read_text())["source"]
    np.testing.assert_array_equal(pixels, np.load(source))
    assert c.get("/api/images/2").status_code == 400
    assert c.get("/").status_code == 200 and b"review.js" in c.get("/").data


def test_edits_update_counts_refuse_disallowed_classes_and_undo(folder):
    c = _client(folder)
    st = c.get("/api/images/0").get_json()
    chal = _columns(st, site="chalcogen", class_id=2)[0]
    before = _count(st, "vac_X1"), _count(st, "chalcogen"), st["counts"]["defects"]["count"]
    st = c.post(
        "/api/images/0/edits",
        json={"action": "change", "column": chal["column"], "class": "vac_X1"},
    ).get_json()
    assert (_count(st, "vac_X1"), _count(st, "chalcogen"), st["counts"]["defects"]["count"]) == (
        before[0] + 1,
        before[1] - 1,
        before[2] + 1,
    )
    # a metal-site class on a chalcogen site: refused with one line, nothing changed
    r = c.post(
        "/api/images/0/edits", json={"action": "change", "column": chal["column"], "class": "vac_M"}
    )
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert "'vac_M'" in error and "chalcogen site" in error and "\n" not in error
    st = c.get("/api/images/0").get_json()
    assert len(st["edits"]) == 1 and _count(st, "vac_X1") == before[0] + 1
    # add a missed column between two sites: the metal class puts it on the metal sublattice
    n, dopants = len(st["columns"]), _count(st, "dopant_M")
    st = c.post(
        "/api/images/0/edits", json={"action": "add", "x": 40.3, "y": 41.7, "class": "dopant_M"}
    ).get_json()
    added = _columns(st, review="added")
    assert len(st["columns"]) == n + 1 and added[0]["site"] == "metal"
    assert added[0]["column"] == n and _count(st, "dopant_M") == dopants + 1
    # delete it, then undo twice: back to the single change
    st = c.post("/api/images/0/edits", json={"action": "delete", "column": n}).get_json()
    assert len(st["columns"]) == n
    c.post("/api/images/0/undo")
    st = c.post("/api/images/0/undo").get_json()
    assert len(st["columns"]) == n and [e["action"] for e in st["edits"]] == ["change"]
    assert st["dirty"]
    for bad in (
        {"action": "change", "column": 99999, "class": "metal"},
        {"action": "change", "column": 0, "class": "no_such_class"},
        {"action": "add", "x": -50, "y": 3, "class": "metal"},
        {"action": "explode"},
        {"action": "change"},
    ):
        r = c.post("/api/images/0/edits", json=bad)
        assert r.status_code == 400 and r.get_json()["error"], bad
    assert len(c.get("/api/images/0").get_json()["edits"]) == 1


def test_save_writes_beside_the_originals_and_a_second_session_resumes(folder):
    original = _digest(folder)
    c = _client(folder)
    st = c.get("/api/images/0").get_json()
    metals = _columns(st, site="metal", class_id=1)
    chals = _columns(st, site="chalcogen", class_id=2)
    plan = [
        {"action": "change", "column": metals[0]["column"], "class": "vac_M"},
        {"action": "change", "column": chals[0]["column"], "class": "sub_X1"},
        {"action": "delete", "column": chals[1]["column"]},
        {"action": "add", "x": 10.0, "y": 12.5, "class": "sub_X2"},
    ]
    for edit in plan:
        assert c.post("/api/images/0/edits", json=edit).status_code == 200
    written = c.post("/api/save").get_json()["written"]
    assert sorted(written) == sorted(
        [f"img0/{CORRECTIONS}", f"img0/{COLUMNS_CORRECTED}", f"img0/{SUMMARY_CORRECTED}"]
        + ["summary_corrected.csv"]
    )
    after = _digest(folder)
    assert {k: after[k] for k in original} == original  # the originals untouched
    with open(folder / "img0" / CORRECTIONS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["action"], r["old_class"], r["new_class"]) for r in rows] == [
        ("change", "metal", "vac_M"),
        ("change", "chalcogen", "sub_X1"),
        ("delete", "chalcogen", ""),
        ("add", "", "sub_X2"),
    ]
    assert rows[3]["site"] == "chalcogen" and float(rows[3]["y_px"]) == 12.5
    assert all(r["image"] == "img0" and r["time"].endswith("+00:00") for r in rows)
    # corrected catalogue and summary agree with each other and with the edits
    orig = read_columns_csv(folder / "img0" / "columns.csv")
    cat = read_columns_csv(folder / "img0" / COLUMNS_CORRECTED, scheme="defects")
    assert len(cat) == len(orig)  # one deleted, one added
    summary = json.loads((folder / "img0" / SUMMARY_CORRECTED).read_text())
    redo = summarize(cat, "defects", (96, 96), summary["pixel_size_A"])
    assert {k: v["count"] for k, v in summary["classes"].items()} == {
        k: v["count"] for k, v in redo["classes"].items()
    }
    first = json.loads((folder / "img0" / "summary.json").read_text())
    assert summary["classes"]["vac_M"]["count"] == first["classes"]["vac_M"]["count"] + 1
    assert summary["n_columns"] == first["n_columns"] - 1  # metal -> vac_M: no column there
    assert summary["review"]["edits"] == 4 and summary["review"]["deleted"] == 1
    # a second session resumes: same state, and undo reaches the first session's edits
    c2 = _client(folder)
    st2 = c2.get("/api/images/0").get_json()
    assert len(st2["edits"]) == 4 and not st2["dirty"]
    assert st2["counts"] == c.get("/api/images/0").get_json()["counts"]
    chal = _columns(st2, site="chalcogen", class_id=2)[0]["column"]
    edit = {"action": "change", "column": chal, "class": "vac_X2"}
    assert c2.post("/api/images/0/edits", json=edit).status_code == 200
    c2.post("/api/save")
    with open(folder / "img0" / CORRECTIONS, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    assert not (folder / "img1" / CORRECTIONS).exists()  # no edits there: nothing written


def test_a_journal_from_another_image_is_refused(folder):
    rv = ImageReview(folder, "img0")
    rv.change(int(np.flatnonzero(rv.site == 1)[0]), "vac_X1")
    rv.save()
    shutil.copy(folder / "img0" / CORRECTIONS, folder / "img1" / CORRECTIONS)
    with pytest.raises(ReviewError, match=r"img1/corrections.csv: line 2: corrections of another"):
        ImageReview(folder, "img1")
    from training.cli import app

    result = runner.invoke(app, ["review", str(folder), "--port", "0"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrections of another image" in lines[0]


def test_a_journal_with_a_class_not_allowed_on_the_site_is_refused(folder):
    rv = ImageReview(folder, "img0")
    k = int(np.flatnonzero(rv.site == 1)[0])
    rv.change(k, "sub_X1")
    rv.save()
    path = folder / "img0" / CORRECTIONS
    path.write_text(path.read_text().replace("sub_X1", "dopant_M"))
    with pytest.raises(ReviewError, match="'dopant_M' is not allowed on the chalcogen site"):
        ImageReview(folder, "img0")


def test_cli_refuses_a_folder_that_is_not_a_label_output_and_a_port_in_use(folder, tmp_path):
    from training.cli import app

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "columns.csv").write_text("x\n")
    for target in (plain, tmp_path / "missing"):
        result = runner.invoke(app, ["review", str(target)])
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(target) in lines[0], lines
    assert (
        "not a `simgen-train label` output folder"
        in runner.invoke(app, ["review", str(plain)]).stderr
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = runner.invoke(app, ["review", str(folder), "--port", str(port)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}: already in use" in lines[0], lines
