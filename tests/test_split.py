"""Edge/cloud split training: quantisation, the cut, the link, the cloud worker and a round
with split pairs and plain clients together."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from clients import losses
from clients.cloud_worker import CloudWorker, spawn_local
from clients.quantize import SCALE_BYTES, dequantize, max_error, quantize
from clients.split import (CloudLink, Hyper, SplitSettings, cloud_step, side_optimizer,
                           split_parts, train_edge)
from clients.transport import LinkError, LinkModel, TokenBucket
from models import EENFamily, ModelConfig, SubmodelSpec
from models.split import check_split, cloud_forward, cloud_keys, edge_forward, edge_keys

from flwr.app import ConfigRecord

from fedeen.protocol import to_record
from inprocess import InProcessGrid, instructions, make_strategy


def tiny_family(name: str = "cnn", policy: str = "base") -> EENFamily:
    backbone = None
    if name in ("resnet18", "vgg16"):
        from models.torchvision_een import ResNet18Options, VGG16Options
        backbone = (ResNet18Options if name == "resnet18" else VGG16Options)(width=8)
    return EENFamily(name, ModelConfig(num_classes=10, policy=policy, backbone=backbone))


def batches(n: int, bs: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n)]


# ---------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_quantisation_error_is_within_half_a_step_and_bytes_are_k_over_32(bits):
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    q = quantize(x, bits)
    err = (dequantize(q) - x).abs().max().item()
    assert err <= max_error(q) + x.abs().max().item() * 2 ** -23
    assert max_error(q) == pytest.approx((x.max() - x.min()).item() / (2 ** bits - 1) / 2, rel=1e-5)
    fp32 = quantize(x, 32)
    assert fp32.nbytes == x.numel() * 4 and (dequantize(fp32) == x).all()
    assert q.nbytes == fp32.nbytes * bits // 32 + SCALE_BYTES


# ---------------------------------------------------------------------- the cut
@pytest.mark.parametrize("name", ["cnn", "vit", "resnet18", "vgg16"])
@pytest.mark.parametrize("policy", ["base", "boosted"])
def test_edge_then_cloud_computes_the_whole_model(name, policy):
    fam = tiny_family(name, policy)
    model = fam.build().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = model(x).logits
        h, edge_logits, _ = edge_forward(model, x, 2)
        split = cloud_forward(model, h, edge_logits, 2).logits
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b)
    keys = list(model.state_dict())
    edge = edge_keys(fam, keys, 2)
    assert sorted(edge + cloud_keys(fam, keys, 2)) == sorted(keys)
    assert any(k.startswith("exits.1.") for k in edge)
    assert not any(k.startswith(("exits.2.", "exits.3.")) for k in edge)


def test_reefl_and_a_cut_without_cloud_exits_are_refused():
    vit_ree = EENFamily("vit-ree", ModelConfig(num_classes=10))
    with pytest.raises(ValueError, match="cannot be split"):
        check_split(vit_ree.build(), 1)
    with pytest.raises(ValueError, match="split exit must be in 1..3"):
        check_split(tiny_family().build(), 4)


def test_no_edge_parameter_gets_a_gradient_from_the_cloud_loss():
    fam = tiny_family(policy="boosted")
    model = fam.build().train()
    x, y = batches(1)[0]
    h, edge_logits, _ = edge_forward(model, x, 2)  # still attached to the edge's graph
    names, cloud = split_parts(fam, model.state_dict(), 2)
    opt = side_optimizer(model, cloud, Hyper(0.1, 0.0, 0.0))
    ctx = losses.ObjectiveContext(instructions({"depth": 4}), {}, model, {})
    cloud_step(model, h, y, edge_logits, losses.get("sum_ce"), ctx, opt, SplitSettings(2))
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in names if n in params)
    assert all(params[n].grad is not None for n in cloud if n in params and ".fc." in n)


def test_conventional_split_learning_gets_the_end_to_end_gradient():
    fam = tiny_family()
    model = fam.build().train()
    x, y = batches(1)[0]
    objective = losses.get("sum_ce")
    ctx = losses.ObjectiveContext(instructions({"depth": 4}), {}, model, {})
    names, cloud = split_parts(fam, model.state_dict(), 1)
    params = dict(model.named_parameters())
    # end to end
    objective(model(x), y, ctx).backward()
    want = {n: params[n].grad.clone() for n in names if n in params}
    model.zero_grad(set_to_none=True)
    # conventional split: cloud returns d loss / d h, edge adds it to its own exits' loss
    h, edge_logits, feats = edge_forward(model, x, 1)
    opt = side_optimizer(model, cloud, Hyper(0.0, 0.0, 0.0))
    _, grad = cloud_step(model, h, y, edge_logits, objective, ctx, opt,
                         SplitSettings(1, bits=32, training="conventional"))
    edge_loss = objective(model.output(edge_logits, feats), y, ctx)
    (edge_loss + (h * grad).sum()).backward()
    for n, g in want.items():
        torch.testing.assert_close(params[n].grad, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- link and worker
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def worker():
    """A cloud worker served from a thread of this process (its sessions inspectable)."""
    w = CloudWorker("127.0.0.1:0", session_timeout=2.0)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            w.serve(max_seconds=0.2)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield w
    stop.set()
    t.join(5)
    w.close()


def open_link(address, fam, model, split_exit=2, **settings):
    link = CloudLink(address, SplitSettings(split_exit, timeout_s=20.0, **settings))
    _, cloud = split_parts(fam, model.state_dict(), split_exit)
    link.open(fam, SubmodelSpec(4), cloud, instructions({"depth": 4}), Hyper(0.05, 0.9, 0.0),
              client_key="test")
    return link


def edge_parts(fam, model, split_exit=2):
    names, _ = split_parts(fam, model.state_dict(), split_exit)
    ctx = losses.ObjectiveContext(instructions({"depth": 4}), {}, model, {})
    return side_optimizer(model, names, Hyper(0.05, 0.9, 0.0)), ctx


def test_unreachable_cloud_fails_fast_naming_its_address():
    address = f"127.0.0.1:{free_port()}"
    fam = tiny_family()
    t0 = time.monotonic()
    with pytest.raises(LinkError, match=address):
        link = CloudLink(address, SplitSettings(2, timeout_s=1.0))
        try:
            link.open(fam, SubmodelSpec(4), split_parts(fam, fam.build().state_dict(), 2)[1],
                      instructions({"depth": 4}), Hyper(0.05, 0.9, 0.0), client_key="x")
        finally:
            link.shutdown()
    assert time.monotonic() - t0 < 5


def test_bounded_queue_blocks_the_edge_until_the_cloud_catches_up(worker, monkeypatch):
    from clients import split as split_mod
    done: dict[int, float] = {}
    real = split_mod.CloudSession.step

    def slow_step(self, h, y, edge_logits):
        time.sleep(0.15)
        out = real(self, h, y, edge_logits)
        done[len(done)] = time.monotonic()
        return out

    monkeypatch.setattr(split_mod.CloudSession, "step", slow_step)
    fam = tiny_family()
    model = fam.build()
    link = open_link(f"127.0.0.1:{worker.port}", fam, model, max_ahead=2)
    sent = []
    try:
        for i, (x, y) in enumerate(batches(8)):
            h, logits, _ = edge_forward(model, x, 2)
            link.send_batch(i, h, y, logits)
            sent.append(time.monotonic())
            assert link.outstanding <= 2
        link.close()
    finally:
        link.shutdown()
    # batch i leaves only after the cloud has finished batch i - 2
    for i in range(2, 8):
        assert sent[i] >= done[i - 2]
    assert sent[-1] - sent[0] >= 5 * 0.15


def test_edge_and_cloud_work_overlap_in_time():
    address = spawn_local(threads=1)
    fam = tiny_family()
    model = fam.build()
    opt, ctx = edge_parts(fam, model)
    link = open_link(address, fam, model)
    try:
        rec = train_edge(model, batches(12, bs=16), losses.get("sum_ce"), ctx, opt, link)
        _, meta = link.close()
    finally:
        link.shutdown()
    cloud = [tuple(i) for i in meta["intervals"]]
    assert len(cloud) == 12 and meta["count"] == 12 * 16
    overlap = sum(max(0.0, min(e1, e2) - max(s1, s2))
                  for s1, e1 in rec.intervals for s2, e2 in cloud)
    assert overlap > 0.0, "the edge waited for the cloud: no edge step overlapped a cloud step"


def test_worker_survives_an_edge_that_vanishes_mid_epoch_and_serves_the_next(worker):
    fam = tiny_family()
    model = fam.build()
    address = f"127.0.0.1:{worker.port}"
    gone = open_link(address, fam, model)
    for i, (x, y) in enumerate(batches(3)):
        h, logits, _ = edge_forward(model, x, 2)
        gone.send_batch(i, h, y, logits)
    gone.shutdown()  # no close: the edge vanished
    before = {k: v.clone() for k, v in split_parts(fam, model.state_dict(), 2)[1].items()}
    opt, ctx = edge_parts(fam, model)
    link = open_link(address, fam, model)
    try:
        train_edge(model, batches(3), losses.get("sum_ce"), ctx, opt, link)
        trained, meta = link.close()
    finally:
        link.shutdown()
    assert meta["count"] == 3 * 8 and set(trained) == set(before)
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    deadline = time.monotonic() + 10
    while worker.sessions and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker.sessions, "the vanished edge's session was never dropped"


def test_malformed_request_gets_an_error_and_the_worker_goes_on(worker):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{worker.port}")
    s.send_multipart([b"not json"])
    assert s.poll(5000)
    assert b"malformed" in s.recv_multipart()[0]
    s.send_multipart([b'{"kind": "batch", "meta": {}, "tensors": []}'])
    assert s.poll(5000) and b"outside a session" in s.recv_multipart()[0]
    s.close(0)
    ctx.term()


def test_token_bucket_paces_messages_at_the_link_rate():
    bucket = TokenBucket(LinkModel(rate_mbps=8.0, latency_ms=10.0, burst_bytes=1000))
    dues = [bucket.due(100_000, now=0.0) for _ in range(3)]  # 1 MB/s
    assert dues[0] == pytest.approx(0.099 + 0.010, abs=1e-6)
    assert np.diff(dues) == pytest.approx([0.1, 0.1], abs=1e-6)
    assert TokenBucket(LinkModel()).due(10**9, now=5.0) == 5.0


# ---------------------------------------------------------------------- in a federation
def test_split_pairs_and_plain_clients_train_one_round_together():
    rc = {"strategy": "eefl", "max-samples-per-client": 40, "split-partitions": "1,3",
          "split-exit": 1}
    strategy = make_strategy(rc)
    grid = InProcessGrid(rc, 4)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    msgs = list(strategy.configure_train(1, to_record(strategy.global_state), ConfigRecord(),
                                         grid))
    replies = grid.send_and_receive(msgs)
    active = [int(r.content["metrics"]["split-active"]) for r in replies
              if "split-active" in r.content["metrics"]]
    assert 1 in active, "no split pair trained with its cloud"
    assert len(active) == 2 and len(replies) == 4
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-failed"] == 0 and metrics["split-pairs"] == active.count(1)
    assert metrics["split-mbytes"] > 0
    after = strategy.global_state
    deep = [k for k in after if k.startswith("exits.3.")]
    assert any(not np.array_equal(after[k], before[k]) for k in deep)


def test_a_private_cloud_worker_does_not_outlive_its_client():
    import os
    import signal
    import subprocess
    import sys
    code = ("from clients import cloud_worker as w; w.spawn_local(); "
            "print(w._LOCAL['proc'].pid, flush=True); import time; time.sleep(60)")
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker_pid = int(client.stdout.readline())
    os.kill(client.pid, signal.SIGKILL)  # no atexit: the worker must notice by itself
    client.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # exited, not yet reaped by its new parent
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("the private cloud worker outlived its killed client")
