import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings",
)

# Whether a fresh 31 MiB tensor comes from the heap (glibc's default serves it with its own
# mmap: the adaptive threshold starts at 128 KiB) -- what tells the settings apart -- and the
# page faults of a training-loop pattern (128 x 1 MiB allocated and freed, three rounds after
# three warm-up rounds). With glibc's defaults those faults depend on the heap's layout (seen
# both every round and never), so only the kept case's reuse is asserted.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from gdseg.engine.host_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None

    big = torch.empty(31 << 18)  # 31 MiB
    with open("/proc/self/maps") as f:
        heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
    bounds = [tuple(int(x, 16) for x in r.split("-")) for r in heap]
    in_heap = any(lo <= big.data_ptr() < hi for lo, hi in bounds)
    del big

    def round_trip():
        tensors = [torch.ones(1 << 18) for _ in range(128)]  # 1 MiB each, written
        del tensors

    for _ in range(3):
        round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        round_trip()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "in_heap": in_heap, "faults": faults}))
    """
)


def _child(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    kept = _child("keep")
    default = _child("default")
    assert kept["applied"] is True
    assert kept["in_heap"] and not default["in_heap"]
    pages = 3 * (128 << 20) // 4096  # what three rounds touch
    assert kept["faults"] < pages // 20


@glibc_only
@pytest.mark.parametrize(
    "env",
    [{"MALLOC_TRIM_THRESHOLD_": "1000000"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}],
)
def test_user_malloc_choices_are_left_alone(env, monkeypatch):
    from gdseg.engine.host_memory import keep_freed_memory

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert keep_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_setup_applies_the_config_key(keep, monkeypatch, tmp_path):
    import argparse

    from gdseg.engine import train

    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1) or True)
    opts = ["OUTPUT_DIR", str(tmp_path), "SEED", "0", "KEEP_FREED_MEMORY", str(keep)]
    train.setup(argparse.Namespace(config_file="", opts=opts))
    assert calls == ([1] if keep else [])
