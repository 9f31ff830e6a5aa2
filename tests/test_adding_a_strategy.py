"""The example strategy of docs/adding-a-strategy.md registers and runs as written."""
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.server_app import run
from inprocess import InProcessGrid
from strategies import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-strategy.md"
RC = {"num-server-rounds": 2, "max-samples-per-client": 32, "max-test-samples": 40}


@pytest.fixture
def example_strategy():
    """The doc's module, imported as ``strategies.example_momentum``; unregistered after."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("strategies.example_momentum")
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    registry.unregister("eefl-momentum")
    del sys.modules[module.__name__]


def final_model(rc: dict, out: Path) -> dict:
    summary = run(InProcessGrid(rc, 4), load_config({**rc, "out-dir": str(out)}))
    assert summary["rounds"][-1]["train"]["clients-failed"] == 0
    return torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)


def test_the_documented_example_is_a_working_strategy(example_strategy, tmp_path, one_thread):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 40
    assert "eefl-momentum" in registry.available()
    with pytest.raises(ConfigError, match="eefl-momentum-beta = 1.5 must be in"):
        load_config({"strategy": "eefl-momentum", "eefl-momentum-beta": 1.5})
    plain = final_model({**RC, "strategy": "eefl"}, tmp_path / "eefl")
    no_momentum = final_model({**RC, "strategy": "eefl-momentum", "eefl-momentum-beta": 0.0},
                              tmp_path / "beta0")
    momentum = final_model({**RC, "strategy": "eefl-momentum", "eefl-momentum-beta": 0.9},
                           tmp_path / "beta09")
    floats = [k for k in plain if plain[k].is_floating_point()]
    # beta = 0 is plain FedAvg; beta > 0 changes the second round's step
    assert all(torch.allclose(plain[k], no_momentum[k], rtol=1e-4, atol=1e-5) for k in floats)
    assert any(not torch.allclose(plain[k], momentum[k], rtol=1e-4, atol=1e-5) for k in floats)
