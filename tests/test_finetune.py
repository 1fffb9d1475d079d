"""Training from human labels (training/finetune.py, ``finetune``, ``train --real``) and the
ranking metrics of evaluate (average precision, AUROC, reliability).

A tiny U-Net is trained for one epoch on a fake store; the "experiments" are a fake label
folder with the fake store's class names (``_labelfolder``), corrected through the review
library, then turned into a store of human labels and mixed into training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from _fakestore import SCHEME, write_fake_store
from _labelfolder import write_label_folder
from typer.testing import CliRunner

from training.config import TrainConfig
from training.data import EpochSampler
from training.experiments.review import ImageReview
from training.finetune import HUMAN_STORE, human_samples, mix_config, write_human_store
from training.metrics import ColumnScores, auroc, average_precision, reliability_bins

runner = CliRunner()
NAMES = ("background", *SCHEME["names"])
FAKE_SCHEME = {"name": "", "names": SCHEME["names"], "ids": SCHEME["ids"], "by": "", "mapping": {}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def reviewed(tmp_path):
    """A fake label folder (0.3 Å/px, 64² px, 3 images) with 2 images reviewed."""
    root = tmp_path / "labelled"
    write_label_folder(root, n_images=3, shape=(64, 64), fake_names=True, pixel_size_A=0.3)
    for name in ("img0", "img2"):
        rv = ImageReview(root, name)
        k = int(np.flatnonzero(rv.class_id == NAMES.index("M"))[0])
        rv.change(k, "vac_M")
        rv.delete(int(np.flatnonzero(rv.class_id == NAMES.index("X2"))[0]))
        rv.add(30.0, 31.0, "vac_X1", site="chalcogen")
        rv.save()
    return root


def test_human_store_masks_follow_the_corrected_catalogue(reviewed, tmp_path):
    samples = human_samples([reviewed], NAMES)
    assert [s.name for s in samples] == ["labelled/img0", "labelled/img2"]  # reviewed only
    assert len(human_samples([reviewed], NAMES, reviewed_only=False)) == 3
    rv = ImageReview(reviewed, "img0")
    cat = rv.catalogue()
    # the network works at 0.25 Å/px: the image grows by 0.3/0.25 = 1.2, positions follow
    path = write_human_store(
        samples, tmp_path / "h.zarr", scheme=FAKE_SCHEME, pixel_size_A=0.25, disk_radius_A=0.5
    )
    root = zarr.open_group(str(path), mode="r")
    assert root["images"].shape == (2, 77, 77) and root.attrs["pixel_size_A"] == 0.25
    mask = np.asarray(root["masks"][0])
    f = 77 / 64
    for x, y, c in zip(cat.x_px, cat.y_px, cat.class_id, strict=True):
        r, q = round((y + 0.5) * f - 0.5), round((x + 0.5) * f - 0.5)
        if 0 <= r < 77 and 0 <= q < 77:
            assert mask[r, q] == c  # every site, the edits included, carries its class
    added = cat.class_id[-1]
    assert NAMES[added] == "vac_X1"
    # the deleted column is background in the mask
    orig = ImageReview(reviewed, "img0").original
    gone = [k for k in range(len(orig)) if k not in set(rv.ids[rv.alive].tolist())]
    x, y = orig.x_px[gone[0]], orig.y_px[gone[0]]
    assert mask[round((y + 0.5) * f - 0.5), round((x + 0.5) * f - 0.5)] == 0
    from training.stores import open_store

    st = open_store(path)
    assert list(st.scheme.names) == SCHEME["names"] and st.n_samples == 2


def test_images_labelled_elsewhere_points_and_masks(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    img = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    np.save(folder / "a.npy", img)
    (folder / "a.csv").write_text("x_px,y_px,class_name\n10,12,M\n20.5,22,vac_X1\n")
    np.save(folder / "b.npy", img)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:8, 5:8] = 2
    np.save(folder / "b_mask.npy", mask)
    a, b = human_samples([folder], NAMES, pixel_size_A=0.3)
    assert a.class_id.tolist() == [1, 3] and b.mask is not None
    path = write_human_store(
        [a, b], tmp_path / "e.zarr", scheme=FAKE_SCHEME, pixel_size_A=0.3, disk_radius_A=0.6
    )
    root = zarr.open_group(str(path), mode="r")
    assert root["masks"][0][12, 10] == 1 and root["masks"][0][22, 20] == 3
    np.testing.assert_array_equal(root["masks"][1], mask)
    (folder / "a.csv").write_text("x_px,y_px,class_name\n10,12,metal\n")
    with pytest.raises(ValueError, match=r"a.csv: line 2: class 'metal' is not one of"):
        human_samples([folder], NAMES, pixel_size_A=0.3)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a label output folder"):
        human_samples([empty], NAMES)


def test_store_weights_set_the_share_of_draws():
    # 10 simulated items and 2 real ones; half the draws should be real
    w = np.r_[np.full(10, 0.5 / 10), np.full(2, 0.5 / 2)]
    sampler = EpochSampler(12, 4000, seed=3, weights=w)
    items = np.array([k[0] for k in sampler])
    assert abs(np.mean(items >= 10) - 0.5) < 0.03
    assert [k for k in sampler] == [k for k in sampler]  # an epoch is reproducible
    cfg = TrainConfig.from_dict({"data": {"train_stores": ["a.zarr", "b.zarr"]}})
    mixed = mix_config(cfg, "h.zarr", 0.25)
    assert mixed.data.train_stores == ("a.zarr", "b.zarr", "h.zarr")
    assert mixed.data.store_weights == pytest.approx((0.375, 0.375, 0.25))
    with pytest.raises(ValueError, match="store_weights: 2 weight"):
        TrainConfig.from_dict({"data": {"train_stores": ["a"], "store_weights": [1, 1]}})
    with pytest.raises(ValueError, match="--real-fraction"):
        mix_config(cfg, "h.zarr", 1.5)


def _base_run(tmp_path):
    from training.train import train_model

    store = write_fake_store(tmp_path / "sim.zarr", n_samples=6, shape=(64, 64))
    config = TrainConfig.from_dict(
        {
            "seed": 0,
            "epochs": 1,
            "progress": False,
            "num_threads": 1,
            "data": {"train_stores": [str(store)], "crop": 32, "batch_size": 4},
            "model": {"depth": 1, "width": 4},
        }
    )
    return store, train_model(config, tmp_path / "base").out_dir


def test_finetune_cli_starts_from_the_run_and_mixes_the_corrections(reviewed, tmp_path):
    from training.cli import app
    from training.train import load_checkpoint_dict

    store, base = _base_run(tmp_path)
    out = tmp_path / "ft"
    args = ["finetune", str(base), "--corrected", str(reviewed), "-o", str(out), "--epochs", "1"]
    args += ["--lr", "1e-12", "--members", "2", "--real-fraction", "0.5", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "ensemble.json").is_file() and (out / HUMAN_STORE).is_dir()
    start = load_checkpoint_dict(base / "best.pt")["model_state"]
    for k in range(2):
        ck = load_checkpoint_dict(out / f"member_{k:02d}" / "last.pt")
        cfg = ck["config"]
        assert cfg["init_from"] == [str(base / "best.pt")]
        assert cfg["data"]["store_weights"] == [0.5, 0.5]
        assert cfg["data"]["train_stores"][-1] == str(out / HUMAN_STORE)
        # with a vanishing learning rate the weights are still the run's: it started there
        # (batch-norm running statistics move whatever the learning rate)
        for name, value in start.items():
            if name.endswith(("weight", "bias")):
                torch.testing.assert_close(ck["model_state"][name], value, atol=1e-6, rtol=0)
    # train --real from scratch takes the same human labels
    out2 = tmp_path / "scratch"
    args = ["train", "-s", str(store), "--real", str(reviewed), "-o", str(out2), "--epochs", "1"]
    args += ["--set", "model.depth=1", "--set", "model.width=4", "--set", "data.crop=32", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(out2 / HUMAN_STORE), mode="r")["images"].shape[0] == 2
    # evaluate prints and writes AP and AUROC per class and the reliability diagram
    rep = tmp_path / "rep"
    result = runner.invoke(app, ["evaluate", str(base), str(store), "-o", str(rep), "-q"])
    assert result.exit_code == 0, result.output
    assert "AP " in result.stdout and "AUROC " in result.stdout
    metrics = json.loads((rep / "metrics.json").read_text())
    m = metrics["classes"]["M"]
    assert 0.0 <= m["ap"] <= 1.0 and 0.0 <= m["auroc"] <= 1.0
    assert (rep / "reliability.png").stat().st_size > 0
    assert sum(metrics["reliability"]["count"]) > 0
    # bad input: a folder without reviewed images, one line
    bare = tmp_path / "bare"
    write_label_folder(bare, n_images=1, shape=(64, 64), fake_names=True, pixel_size_A=0.3)
    result = runner.invoke(app, ["finetune", str(base), "--corrected", str(bare), "-o",
                                 str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "no reviewed image" in result.stderr


def test_average_precision_and_auroc_by_hand():
    y, s = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    assert average_precision(y, s) == pytest.approx((1 + 2 / 3) / 2)
    assert auroc(y, s) == pytest.approx(3 / 4)
    assert auroc([1, 0], [0.5, 0.5]) == 0.5 and average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert average_precision([0, 0], [0.1, 0.2]) is None and auroc([1, 1], [0.1, 0.2]) is None
    rng = np.random.default_rng(0)
    u = rng.random(2000)
    err = rng.random(2000) < u  # the error probability equals the uncertainty
    rel = reliability_bins(u, err, n_bins=5)
    assert np.all(np.diff(rel["error_rate"]) > 0) and rel["spearman"] > 0.3
    assert rel["error_rate"][0] == pytest.approx(0.1, abs=0.05)


def test_column_scores_rank_detections_by_class_probability():
    scores = ColumnScores(["background", "a", "b"])
    true = {
        "x": np.array([5.0, 15, 25, 35]),
        "y": np.zeros(4) + 5,
        "class_id": np.array([1, 1, 2, 2]),
    }
    # detections: a sure 'a', an unsure 'a', a 'b' called 'a' with low confidence, one spurious
    pred = {
        "x": np.array([5.0, 15, 25, 45]), "y": np.zeros(4) + 5, "class_id": np.array([1, 1, 1, 2]),
        "probs": np.array([[0, 0.9, 0.1], [0, 0.6, 0.4], [0, 0.55, 0.45], [0, 0.2, 0.8]]),
        "uncertainty": np.array([0.01, 0.1, 0.2, 0.05]),
    }  # fmt: skip
    scores.add_columns(pred, true, radius_px=2.0)
    s = scores.summary()
    # class a: positives at ranks 1, 2 (scores .9, .6) above negatives .55, .2 and the missed
    assert s["classes"]["a"]["ap"] == pytest.approx(1.0)
    assert s["classes"]["a"]["auroc"] == pytest.approx(1.0)
    # class b: positives are the .45 column and the missed one (0); negatives .1, .4, .8
    assert s["classes"]["b"]["auroc"] == pytest.approx(2 / 6)
    assert s["mean_ap"] == pytest.approx(np.mean([1.0, s["classes"]["b"]["ap"]]))
    assert s["reliability"]["count"] == [1, 1, 1]
    assert s["reliability"]["error_rate"] == [0.0, 0.0, 1.0]  # the most uncertain is wrong
