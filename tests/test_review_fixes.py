"""Reproducibility, evaluation and bad-input behaviours found in review."""
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import strategies
from fakes import InProcessGrid
from fedeen.client_app import client_for
from fedeen.config import ConfigError, load_config
from fedeen.data import load_server_data, source_for
from fedeen.runtime import family_for, resolve_device
from fedeen.server_app import CentralEvaluator
from strategies.base import ClientUpdate, to_record

RC = {"fraction-train": 0.5, "max-samples-per-client": 30, "max-test-samples": 100}


def make(rc):
    cfg = load_config(rc)
    s = strategies.get(cfg.strategy)(cfg, family_for(cfg, source_for(cfg).info))
    s.global_state = s.family.init_state(cfg.seed)
    return s


def sampled_partitions(first_node_id: int) -> list[int]:
    grid = InProcessGrid(RC, 8, first_node_id=first_node_id)
    strategy = make(RC)
    msgs = strategy.configure_train(1, to_record(strategy.global_state), ConfigRecord(), grid)
    return sorted(m.metadata.dst_node_id - first_node_id for m in msgs)


def test_sampling_depends_on_the_seed_not_on_flowers_random_node_ids():
    assert sampled_partitions(1000) == sampled_partitions(987_654_321) != []


def test_replies_are_aggregated_in_a_stable_order():
    strategy = make(RC)
    strategy.node_keys = {10: 2, 11: 1, 12: 0}
    ups = [ClientUpdate(n, lvl, strategy.level_spec(lvl), {}, 1, {}) for n, lvl in
           [(10, 2), (11, 2), (12, 1)]]
    strategy._sent = {10: 2, 11: 2, 12: 1}
    strategy.validate_reply = lambda msg: msg  # the updates stand in for validated replies
    assert [u.node_id for u in strategy.collect(reversed(ups))] == [12, 11, 10]


def test_too_few_nodes_fail_with_a_clear_error():
    strategy = make({"min-nodes": 3})
    with pytest.raises(RuntimeError, match="min-nodes = 3"):
        strategy.wait_for_nodes(InProcessGrid({}, 2), timeout=0.01)


def test_node_without_partition_is_refused():
    ctx = Context(run_id=1, node_id=1, node_config={"budget-level": 2}, state=RecordDict(),
                  run_config={})
    with pytest.raises(ConfigError, match="partition-id and num-partitions"):
        client_for(ctx)


def test_cnn_has_at_most_four_levels():
    with pytest.raises(ConfigError, match="at most 4 budget levels"):
        load_config({"budget-ratios": "0.2,0.2,0.2,0.2,0.2"})
    load_config({"budget-ratios": "0.2,0.2,0.2,0.2,0.2", "model": "vit", "vit-blocks": 5})


def test_scalefl_top_level_is_full_width():
    with pytest.raises(ConfigError, match="must be 1.0"):
        load_config({"strategy": "scalefl", "scalefl-widths": "0.4,0.55,0.75,0.9"})


def test_darkdistill_rejects_a_broken_difficulty_record():
    strategy = make({"strategy": "darkdistill"})
    spec = strategy.level_spec(1)
    bad = ClientUpdate(1, 1, spec, {}, 3, {}, {"difficulty": {
        "labels": np.array([0, 1, 2]), "difficulty": np.array([0.1, np.nan, 0.3], np.float32)}})
    assert "non-finite" in strategy.record_problems(bad)
    good = ClientUpdate(1, 1, spec, {}, 3, {}, {"difficulty": {
        "labels": np.array([0, 1, 2]), "difficulty": np.array([0.1, 0.2, 0.3], np.float32)}})
    assert strategy.record_problems(good) is None


def evaluator_for(strategy):
    cfg = strategy.cfg
    return CentralEvaluator(strategy.family, load_server_data(cfg), cfg, resolve_device(cfg),
                            strategy)


def constant_heads(state, cls, num_classes=10):
    """A copy of ``state`` whose every exit always predicts class ``cls``."""
    out = {k: v.copy() for k, v in state.items()}
    for k in out:
        if k.startswith("exits.") and k.endswith("fc.bias"):
            out[k] = np.eye(num_classes, dtype=np.float32)[cls] * 1e4
    return out


def test_exit_states_score_an_exit_on_its_own_level_model():
    strategy = make({"max-test-samples": 200})
    ev = evaluator_for(strategy)
    y = ev.data.test.y
    share = [float((y == c).float().mean()) for c in range(10)]
    a, b = int(np.argmax(share)), int(np.argmin(share))
    global_state = constant_heads(strategy.global_state, a)
    own = constant_heads(strategy.global_state, b)
    own = {k: v for k, v in own.items() if k in strategy.family.shapes(strategy.level_spec(1))}
    strategy.exit_states = lambda: {1: own}
    m = ev(1, to_record(global_state))
    assert m["acc-exit-1"] == pytest.approx(share[b])   # scored on its own level's model
    assert m["acc-exit-2"] == pytest.approx(share[a])   # scored on the global model


def test_budget_curve_comes_from_the_best_validation_round():
    strategy = make({"max-test-samples": 200})
    ev = evaluator_for(strategy)
    y = ev.data.val.y
    share = [float((y == c).float().mean()) for c in range(10)]
    good = constant_heads(strategy.global_state, int(np.argmax(share)))
    bad = constant_heads(strategy.global_state, int(np.argmin(share)))
    ev(1, to_record(good))
    kept = [z.clone() for z in ev.best[1]]
    ev(2, to_record(bad))  # worse on validation: the best round stays round 1
    assert all(torch.equal(k, z) for k, z in zip(kept, ev.best[1]))
    best, final = ev.curve(best=True), ev.curve(best=False)
    assert best[0].accuracy == pytest.approx(float((ev.data.test.y == int(np.argmax(share))).float().mean()))
    assert best != final


def test_resume_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    import json

    from fedeen.server_app import run

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
