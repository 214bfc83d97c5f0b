"""Distributed helpers in one plain process (the two-process run is in test_train.py)."""

import pytest
import torch

from gdseg.engine import distributed as comm
from gdseg.engine.launch import launch


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


def test_launch_joins_a_torchrun_process_group(monkeypatch):
    """Under torchrun (RANK/WORLD_SIZE/MASTER_* set) launch initializes from env:// and
    does not spawn."""
    from gdseg.engine.launch import find_free_port

    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
    }.items():
        monkeypatch.setenv(k, v)
    seen = []

    def body():
        seen.append((comm.is_initialized(), comm.get_world_size(), comm.get_local_rank()))

    launch(body, 8, backend="gloo")  # --num-gpus is ignored: torchrun decided
    assert seen == [(True, 1, 0)]
    assert not comm.is_initialized()
