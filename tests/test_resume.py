"""Resuming a run from its checkpoint continues exactly where it stopped."""
import json

import pytest
import torch

from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.server_app import run
from inprocess import InProcessGrid


def test_resume_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    rc = {"max-samples-per-client": 40, "max-test-samples": 100, "local-epochs": 1}
    straight = run(InProcessGrid(rc, 4), load_config({**rc, "num-server-rounds": 3,
                                                      "out-dir": str(tmp_path / "a")}))
    first = run(InProcessGrid(rc, 4), load_config({**rc, "num-server-rounds": 2,
                                                   "out-dir": str(tmp_path / "b")}))
    resumed = run(InProcessGrid(rc, 4), load_config({**rc, "num-server-rounds": 3,
                                                     "out-dir": str(tmp_path / "b"),
                                                     "resume": first["run_dir"]}))
    assert resumed["run_dir"] == first["run_dir"]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["final"] == straight["final"]
    a = torch.load(f"{straight['run_dir']}/final_model.pt")
    b = torch.load(f"{resumed['run_dir']}/final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in \['alpha'\]"):
        run(InProcessGrid(rc, 4), load_config({**rc, "alpha": 0.3, "num-server-rounds": 3,
                                               "resume": first["run_dir"]}))
    assert json.loads((tmp_path / "b").joinpath(
        first["run_dir"], "metrics.json").read_text())["final"]["round"] == 3


# Strategies whose server state holds numpy arrays (FedDyn's h, InclusiveFL's private models
# and Adam moments), tuples (the sampler's random state) or torch optimiser states; the
# checkpoint must give each back exactly under torch.load(weights_only=True).
STATEFUL = {"eefl": {}, "depthfl-feddyn": {"strategy": "depthfl", "depthfl-feddyn": True},
            "inclusivefl-adam": {"strategy": "inclusivefl", "inclusivefl-server-opt": "adam"},
            "darkdistill": {"strategy": "darkdistill"}}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_resumed_run_of_a_stateful_strategy_equals_an_uninterrupted_one(tmp_path, name,
                                                                         one_thread):
    rc = {"max-samples-per-client": 40, "max-test-samples": 100, "local-epochs": 1,
          **STATEFUL[name]}
    straight = run(InProcessGrid(rc, 4), load_config({**rc, "num-server-rounds": 2,
                                                      "out-dir": str(tmp_path / "a")}))
    grid = InProcessGrid(rc, 4)  # the nodes keep their state (FedDyn's), as SuperNodes do
    first = run(grid, load_config({**rc, "num-server-rounds": 1, "out-dir": str(tmp_path / "b")}))
    resumed = run(grid, load_config({**rc, "num-server-rounds": 2, "out-dir": str(tmp_path / "b"),
                                     "resume": first["run_dir"]}))
    assert resumed["final"] == straight["final"]
    a = torch.load(f"{straight['run_dir']}/final_model.pt", weights_only=True)
    b = torch.load(f"{resumed['run_dir']}/final_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
