"""deepseek_ext.train.Monitor: sampling, metrics files, TensorBoard events, plots, cost."""

import json
import time

import pytest
import torch

from deepseek_ext.train import Monitor


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tb_scalars(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(out_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    ea = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def run_loop(mon, steps=20):
    losses = []
    for step in range(steps):
        with mon.data_wait():
            time.sleep(0.002)
        loss = torch.tensor(2.0 / (step + 1), requires_grad=True) * 1.0
        losses.append(loss.item())
        mon.log(step, loss=loss, lr=1e-3 * (step + 1), tokens=512)
        time.sleep(0.003)
    return losses


def test_monitor_writes_metrics_samples_and_summary(tmp_path):
    with Monitor(tmp_path, price_per_device_hour=3.6, num_devices=2, sample_interval_s=0.02) as mon:
        losses = run_loop(mon)
        time.sleep(0.1)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(20))
    assert [r["loss"] for r in recs] == pytest.approx(losses)
    assert recs[4]["lr"] == pytest.approx(5e-3) and recs[0]["tokens"] == 512
    assert all(r["tokens_per_s"] > 0 for r in recs[1:]) and "tokens_per_s" not in recs[0]
    assert all(r["time"] <= s["time"] for r, s in zip(recs, recs[1:]))
    samples = read_jsonl(tmp_path / "system.jsonl")
    assert len(samples) >= 3
    for s in samples:
        assert 0 <= s["cpu_percent"] <= 100 and s["rss_mb"] > 10 and "cost" in s
    summ = json.loads((tmp_path / "summary.json").read_text())
    assert summ["logged_steps"] == 20
    assert summ["last_step"] == 19 and summ["last"]["loss"] == pytest.approx(losses[-1])
    # cost = hours * price * devices: 3.6 per hour per device x 2 = 2e-3 per second
    assert summ["cost"] == pytest.approx(summ["wall_time_s"] * 2e-3, rel=1e-6)
    assert 20 * 0.002 <= summ["data_wait_s"] < summ["wall_time_s"]
    assert summ["data_wait_fraction"] == pytest.approx(summ["data_wait_s"] / summ["wall_time_s"])
    assert summ["peak_rss_mb"] >= max(s["rss_mb"] for s in samples) * 0.99
    assert summ["mean_cpu_percent"] is not None and summ["num_samples"] == len(samples)
    assert summ["tokens_total"] == 20 * 512 and summ["tokens_per_s"] > 0
    assert summ["mean_gpu_util_percent"] is None  # CPU run: no GPU fields


def test_tensorboard_events_hold_the_metrics(tmp_path):
    with Monitor(tmp_path, sample_interval_s=0.05) as mon:
        losses = run_loop(mon, 12)
    sc = tb_scalars(tmp_path)
    assert [s for s, _ in sc["train/loss"]] == list(range(12))
    assert [v for _, v in sc["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert "system/cpu_percent" in sc and "system/rss_mb" in sc and "train/tokens_per_s" in sc


def test_plots_are_written(tmp_path):
    from matplotlib.image import imread

    with Monitor(tmp_path, price_per_device_hour=2.0, sample_interval_s=0.02) as mon:
        run_loop(mon, 15)
    paths = mon.plot()
    assert sorted(p.name for p in paths) == ["cost.png", "loss.png", "resources.png", "throughput.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # not a blank image


def test_timed_iterator_and_summary_while_running(tmp_path):
    mon = Monitor(tmp_path, tensorboard=False, sample_interval_s=0.05).start()

    def slow():
        for k in range(5):
            time.sleep(0.01)
            yield k

    assert list(mon.timed(slow())) == list(range(5))
    mon.log(0, loss=1.5)
    s = mon.summary()
    assert s["data_wait_s"] >= 0.05 and s["logged_steps"] == 1 and s["cost"] is None
    mon.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert mon.close() == mon.summary()  # closing twice is harmless


def test_bad_metrics_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="price_per_device_hour"):
        Monitor(tmp_path, price_per_device_hour=-1)
    with pytest.raises(ValueError, match="sample_interval_s"):
        Monitor(tmp_path, sample_interval_s=0)
    with Monitor(tmp_path / "m", tensorboard=False) as mon:
        with pytest.raises(TypeError, match="loss"):
            mon.log(0, loss="low")
        with pytest.raises(ValueError, match="scalar"):
            mon.log(0, loss=torch.ones(3))


@pytest.mark.cuda
def test_logging_device_tensors_does_not_synchronise(tmp_path):
    with Monitor(tmp_path, device="cuda", sample_interval_s=0.05) as mon:
        x = torch.randn(1024, 1024, device="cuda")
        scale = torch.tensor(2.0**16, device="cuda")  # a host-to-device copy: made before the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(10):
                y = x @ x
                mon.log(step, loss=y.mean(), scale=scale, tokens=1024)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = (x @ x).mean().item()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(recs) == 10 and recs[-1]["loss"] == pytest.approx(ref, rel=1e-5) and recs[0]["scale"] == 65536.0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["mean_gpu_util_percent"] is not None and s["peak_gpu_mem_used_mb"] > 0
