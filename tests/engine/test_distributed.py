"""Two gloo processes on CPU: DDP student in sync, one teacher per process in sync, rank 0
alone writes files; and the single-process helpers."""

import os

import pytest
import torch
from engine_fakes import distributed_worker

from gdseg.engine import distributed as comm
from gdseg.engine.launch import launch


@pytest.mark.slow  # spawning two interpreters that import torch takes 20-60 s on 2 busy cores
@pytest.mark.distributed
def test_two_gloo_processes_stay_in_sync(tmp_path):
    """Guided distillation across the burn-in switch, so student (DDP) and teacher (not)."""
    out, report = str(tmp_path / "out"), str(tmp_path / "report")
    os.makedirs(report)
    launch(distributed_worker, 2, args=(out, report, True, 4), backend="gloo")
    r0 = torch.load(os.path.join(report, "rank0.pth"), weights_only=True)
    r1 = torch.load(os.path.join(report, "rank1.pth"), weights_only=True)
    for role in ("student", "teacher"):
        for k, v in r0[role].items():
            assert torch.equal(v, r1[role][k]), f"{role} {k}"
    assert r1["writes"] == []
    assert sorted(os.listdir(out)) == [
        "last_checkpoint",
        "metrics.jsonl",
        "model_0000001.pth",
        "model_final.pth",
    ]
    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert len(ckpt["rng"]["per_rank"]) == 2  # every process's RNG, for an exact resume


def test_single_process_helpers_need_no_process_group():
    assert not comm.is_initialized()
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.is_main_process()
    comm.synchronize()
    assert comm.all_reduce_dict({"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
    m = torch.nn.Linear(2, 2)
    assert comm.unwrap_model(m) is m
    assert comm.broadcast_object({"x": 1}) == {"x": 1}


def test_launch_one_process_calls_directly():
    seen = []
    launch(seen.append, 1, args=("ran",))
    assert seen == ["ran"]
    with pytest.raises(ValueError, match="--machine-rank"):
        launch(seen.append, 1, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="--dist-url"):
        launch(seen.append, 1, num_machines=2, machine_rank=0)
