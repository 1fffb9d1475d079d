"""Training, resumption, ensembles, inference and evaluation on tiny stores."""

import json

import numpy as np
import pytest
import torch
import zarr
from _fakestore import write_fake_store
from torch import nn

from training.config import TrainConfig
from training.evaluate import evaluate_stores
from training.predict import (
    Ensemble,
    load_checkpoint,
    predict_probabilities,
    predict_store,
    resolve_checkpoints,
)
from training.report import read_history_csv
from training.stores import StoreError
from training.train import load_checkpoint_dict, train_ensemble, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return {
        "train": write_fake_store(d / "train.zarr", 24, (48, 48), seed=1, incomplete=[5]),
        "test": write_fake_store(d / "test.zarr", 4, (48, 48), seed=2),
    }


def tiny_config(store, **changes) -> TrainConfig:
    base = {
        "epochs": 6,
        "val_every": 1,
        "progress": False,
        "data": {
            "train_stores": [str(store)],
            "crop": 32,
            "batch_size": 8,
            "val_fraction": 0.25,
            "samples_per_epoch": 32,
        },
        "model": {"depth": 2, "width": 8},
        "optim": {"lr": 1e-2},
    }
    cfg = TrainConfig.from_dict(base)
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    return train_model(tiny_config(stores["train"]), out)


def test_tiny_training_improves_and_beats_chance(trained, stores):
    h = trained.history
    assert trained.finished and len(h) == 6
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert h[-1]["val_loss"] < h[0]["val_loss"]
    # chance: random labels give no columns at the right places; a trained net finds most
    assert h[-1]["val_f1"] > 0.6 and h[-1]["val_miou"] > 0.1
    files = {p.name for p in trained.out_dir.iterdir()}
    assert {"last.pt", "best.pt", "history.csv", "config.yaml"} <= files
    csv = read_history_csv(trained.out_dir / "history.csv")
    assert [r["epoch"] for r in csv] == list(range(1, 7))
    assert csv[-1]["train_loss"] == pytest.approx(h[-1]["train_loss"], rel=1e-5)
    assert TrainConfig.load(trained.out_dir / "config.yaml") == tiny_config(stores["train"])


def test_checkpoint_is_safe_and_complete(trained):
    ckpt = torch.load(trained.last, weights_only=True)
    for key in (
        "model_state",
        "optimizer_state",
        "scheduler_state",
        "rng",
        "epoch",
        "config",
        "label_scheme",
        "class_names",
        "history",
    ):
        assert key in ckpt
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    best = load_checkpoint_dict(trained.best)
    assert best["epoch"] == best["best_epoch"]
    assert best["best"] == max(r["val_macro_f1"] for r in trained.history)


def test_resume_reproduces_uninterrupted_run(stores, tmp_path):
    cfg = tiny_config(
        stores["train"],
        epochs=4,
        model={"depth": 2, "width": 4, "dropout": 0.2},
        optim={"lr": 1e-2, "schedule": "onecycle"},
        augment={"noise_std": 0.2},
    )
    straight = train_model(cfg, tmp_path / "a")
    first = train_model(cfg, tmp_path / "b", stop_after=2)
    assert not first.finished and len(first.history) == 2
    with pytest.raises(ValueError, match="already holds a run"):
        train_model(cfg, tmp_path / "b")
    with pytest.raises(ValueError, match="optim.lr"):
        train_model(
            cfg.replace(optim={**cfg.optim.to_dict(), "lr": 0.1}), tmp_path / "b", resume=True
        )
    resumed = train_model(cfg.replace(progress=True), tmp_path / "b", resume=True)
    assert resumed.finished
    a, b = load_checkpoint_dict(straight.last), load_checkpoint_dict(resumed.last)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in resumed.history]
    ta, tb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    for key in ta:
        assert torch.equal(ta[key]["exp_avg"], tb[key]["exp_avg"])


def test_predict_tiles_blend_without_seams():
    torch.manual_seed(0)
    pointwise = nn.Conv2d(1, 3, 1).eval()  # no context: tiles must reproduce the whole image
    img = np.random.default_rng(0).poisson(5.0, (70, 90)).astype(np.float32)
    whole = predict_probabilities(pointwise, img, tile=128)
    tiled = predict_probabilities(pointwise, img, tile=32, overlap=8, batch_size=3)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)
    np.testing.assert_allclose(whole.sum(0), 1.0, atol=1e-5)
    tta = predict_probabilities(pointwise, img, tile=32, overlap=8, tta=True)
    np.testing.assert_allclose(tta, whole, atol=1e-6)


def test_ensemble_of_identical_members_has_zero_variance(trained, stores):
    model, info = load_checkpoint(trained.best)
    assert info["class_names"][1] == "M"
    ens = Ensemble.load([trained.best, trained.best, trained.best])
    img = zarr.open_group(str(stores["test"]), mode="r")["images"][0]
    mean, var = ens.predict(img, tile=32, overlap=8)
    single = predict_probabilities(model, img, tile=32, overlap=8)
    assert np.all(var == 0.0)
    np.testing.assert_array_equal(mean, single)
    assert mean.shape == (6, 48, 48)


def test_ensemble_training_and_evaluation(stores, tmp_path):
    cfg = tiny_config(stores["train"], epochs=2, members=2, model={"depth": 1, "width": 4})
    results = train_ensemble(cfg, tmp_path / "ens")
    assert [r.out_dir.name for r in results] == ["member_00", "member_01"]
    seeds = [load_checkpoint_dict(r.last)["config"]["seed"] for r in results]
    assert seeds == [0, 1]
    assert len(resolve_checkpoints(tmp_path / "ens")) == 2
    ens = Ensemble.load(tmp_path / "ens")
    img = zarr.open_group(str(stores["test"]), mode="r")["images"][1]
    mean, var = ens.predict(img)
    assert var.max() > 0 and np.allclose(mean.sum(0), 1.0, atol=1e-5)
    out = evaluate_stores(tmp_path / "ens", [stores["test"]], out_dir=tmp_path / "rep")
    assert out["n_members"] == 2 and out["n_images"] == 4
    assert out["uncertainty"]["mean_variance_predicted_class"] > 0
    assert (tmp_path / "rep" / "confusion.png").is_file()
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(saved["classes"]) == {"M", "X2", "vac_X1", "vac_X2", "vac_M"}


def test_evaluate_and_predict_store(trained, stores, tmp_path):
    res = evaluate_stores(trained.out_dir, [stores["test"]], out_dir=tmp_path / "eval")
    assert res["detection"]["f1"] > 0.6
    assert res["checkpoints"] == [str(trained.best)]
    out = predict_store(
        trained.out_dir,
        stores["test"],
        tmp_path / "pred.zarr",
        save_probabilities=True,
        indices=[1, 3],
    )
    root = zarr.open_group(str(out), mode="r")
    assert list(root["index"][:]) == [1, 3]
    assert root["class_map"].shape == (2, 48, 48) and root["probability"].shape == (2, 6, 48, 48)
    assert "variance" not in root
    samples = root["columns/sample"][:]
    assert set(samples) == {1, 3} and len(root["columns/x"][:]) == len(samples)
    assert root.attrs["class_names"][2] == "X2"
    with pytest.raises(ValueError, match="already exists"):
        predict_store(trained.out_dir, stores["test"], out)


def test_bad_input_gives_clear_errors(trained, stores, tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        train_model(tiny_config(tmp_path / "missing.zarr"), tmp_path / "r1")
    assert not (tmp_path / "r1").exists()
    v2 = write_fake_store(tmp_path / "v2.zarr", 2, (32, 32), schema_version=2)
    with pytest.raises(StoreError, match="schema_version"):
        evaluate_stores(trained.out_dir, [v2])
    other = write_fake_store(
        tmp_path / "other.zarr",
        2,
        (48, 48),
        scheme={"ids": [1, 2], "names": ["M", "X2"]},
        defect_rate=0.0,
    )
    with pytest.raises(StoreError, match="label scheme mismatch.*the model's"):
        evaluate_stores(trained.out_dir, [other])
    with pytest.raises(StoreError, match="label scheme mismatch"):
        predict_store(trained.out_dir, other, tmp_path / "p.zarr")
    with pytest.raises(ValueError, match="checkpoint not found|model not found"):
        evaluate_stores(tmp_path / "nothing.pt", [stores["test"]])
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(ValueError, match="not a simgen-train checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="class_weights"):
        train_model(
            tiny_config(stores["train"], loss={"class_weights": [1.0, 2.0]}), tmp_path / "r2"
        )


@pytest.mark.parametrize(
    "length, tile, overlap", [(2048, 512, 64), (600, 512, 64), (100, 64, 63), (37, 64, 8)]
)
def test_tiles_are_the_fewest_of_one_size_and_overlap_enough(length, tile, overlap):
    from training.predict import _tiling

    size, starts = _tiling(length, tile, overlap)
    assert size <= tile and starts[0] == 0 and starts[-1] + size == length
    assert all(size - (b - a) >= overlap for a, b in zip(starts, starts[1:], strict=False))
    assert len(starts) == (1 if length <= tile else -(-(length - overlap) // (tile - overlap)))
    if (length, tile) == (2048, 512):  # five tiles of 464 px, not five of 512
        assert (size, len(starts)) == (464, 5)
