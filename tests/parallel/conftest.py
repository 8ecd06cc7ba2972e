"""Fixtures shared by the in-process tests of parallel/."""
import os
import socket

import deepspeed
import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group for DeepSpeed in this process; the environment it needs is
    restored afterwards (end-to-end tests launch subprocesses that inherit it)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if deepspeed.comm.is_initialized():  # it also forgets the groups DeepSpeed made (a world clone)
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
