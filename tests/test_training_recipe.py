"""A scaled-down CPU recipe end to end (slow): train, then score on another seed."""

import pytest
import torch
from _fakestore import write_fake_store

from training.config import TrainConfig
from training.evaluate import evaluate_stores
from training.train import train_model


@pytest.mark.slow
def test_scaled_down_recipe_detects_columns_on_another_seed(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        common = {"pixel_size_A": 0.2, "dose": (5.0, 20.0), "defect_rate": 0.06}
        train = write_fake_store(tmp_path / "train.zarr", 64, (128, 128), seed=20, **common)
        test = write_fake_store(tmp_path / "test.zarr", 8, (128, 128), seed=21, **common)
        cfg = TrainConfig.from_dict(
            {
                "epochs": 12,
                "progress": False,
                "data": {"train_stores": [str(train)], "crop": 96, "samples_per_epoch": 128},
            }
        )
        run = train_model(cfg, tmp_path / "run")
        assert run.finished
        res = evaluate_stores(run.out_dir, [test], out_dir=tmp_path / "report")
    finally:
        torch.set_num_threads(n)
    assert res["detection"]["f1"] >= 0.95
    assert res["classes"]["vac_X1"]["recall"] >= 0.6
