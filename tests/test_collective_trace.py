"""The collective trace itself (tests/collective_trace): real gloo ranks record what Strata, megatron-core and
DeepSpeed call; ranks that disagree, or hand a collective a tensor on another device, fail the check with the
first disagreement named; a job killed on purpose is compared on its common prefix only. The disagreements
that would hang gloo (a broadcast against an all-reduce) are checked on written traces instead of run."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from tests.collective_trace import TraceRoot, disagreement, read_job
from tests.collective_trace.ranks.strata_collective_recorder import TRACE_ENV
from tests.parallel.dist_helpers import spawn

THIS_FILE = Path(__file__).resolve()

EVERY_KIND = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
              "broadcast_object_list", "new_group", "all_reduce", "send", "recv", "isend", "irecv", "all_reduce",
              "all_gather_into_tensor", "barrier"]


def every_kind_of_collective(rank: int, world: int) -> None:
    """The functions Strata, megatron-core and DeepSpeed call, called the way they call them (EVERY_KIND)."""
    x = torch.ones(4)
    dist.all_reduce(x)
    dist.broadcast(x, src=0)
    dist.all_gather([torch.empty(4) for _ in range(world)], x)
    dist.all_gather_into_tensor(torch.empty(4 * world), x)
    dist.all_gather_object([None] * world, {"rank": rank, "differs": "x" * rank})
    dist.broadcast_object_list([rank, "a"], src=0)
    pair = dist.new_group([0, 1])
    dist.all_reduce(torch.ones(3, dtype=torch.float64), op=dist.ReduceOp.MAX, group=pair)
    if rank == 0:
        dist.send(torch.ones(5), dst=1)
        dist.recv(torch.empty(6), src=1)
    else:
        dist.recv(torch.empty(5), src=0)
        dist.send(torch.ones(6), dst=0)
    peer = 1 - rank
    ops = [dist.P2POp(dist.isend, torch.ones(2), peer), dist.P2POp(dist.irecv, torch.empty(2), peer)]
    for work in dist.batch_isend_irecv(ops):  # what megatron-core's pipeline sends with
        work.wait()
    deepspeed.comm.init_distributed("gloo")  # DeepSpeed's own layer over torch.distributed
    deepspeed.comm.all_reduce(torch.ones(7))
    from megatron.core.tensor_parallel.mappings import dist_all_gather_func  # a reference taken at import

    dist_all_gather_func(torch.empty(2 * world), torch.ones(2))
    dist.barrier()


def only_this_jobs_trace(tmp_path) -> TraceRoot:
    return TraceRoot(tmp_path / "trace")


def test_agreeing_ranks_pass_and_every_call_is_recorded_once(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    spawn(every_kind_of_collective, 2)
    [job] = only_this_jobs_trace(tmp_path).new_jobs()
    assert job.clean and sorted(job.ranks) == [0, 1]
    assert disagreement(job) is None
    mirrored = {"send": "recv", "recv": "send"}  # rank 1 receives first
    assert [e["op"] for e in job.ranks[0].entries] == EVERY_KIND
    assert [e["op"] for e in job.ranks[1].entries] == [mirrored.get(op, op) for op in EVERY_KIND]
    for trace in job.ranks.values():
        assert trace.device == "cpu" and all(e["d"] in ([], ["cpu"]) for e in trace.entries)
    deepspeeds = job.ranks[0].entries[12]
    assert deepspeeds["s"] == ["float32[7]", "SUM"]
    assert deepspeeds["at"].endswith(f"test_collective_trace.py:{line_of('deepspeed.comm.all_reduce(')}"), \
        "a call through deepspeed.comm is attributed to its caller"


def line_of(text: str) -> int:
    lines = THIS_FILE.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line and "line_of" not in line)


def all_reduce_of_another_shape_on_rank_1(rank: int, world: int) -> None:
    try:
        dist.all_reduce(torch.ones(2 + rank))  # gloo may finish this on rank 0: the shapes are never compared
    except RuntimeError:
        pass  # rank 1 hears that rank 0 left; the entry was written before the call


def test_an_all_reduce_of_another_shape_fails_naming_both_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    spawn(all_reduce_of_another_shape_on_rank_1, 2, timeout_s=30)
    [job] = only_this_jobs_trace(tmp_path).new_jobs()
    message = disagreement(job)
    assert message is not None
    assert "group 0 (ranks [0, 1]), its collective 0:" in message
    assert "rank 0: all_reduce float32[2] SUM  (trace entry 0, at tests/test_collective_trace.py:" in message
    assert "rank 1: all_reduce float32[3] SUM  (trace entry 0" in message
    assert "test_an_all_reduce_of_another_shape_fails_naming_both_ranks" in message, "the job's test is named"


def all_reduce_on_meta(rank: int, world: int) -> None:
    dist.all_reduce(torch.ones(4, device="meta"))  # a meta tensor: no data, gloo returns at once
    dist.all_reduce(torch.ones(4))


def test_a_tensor_on_another_device_fails(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    spawn(all_reduce_on_meta, 2, timeout_s=30)
    [job] = only_this_jobs_trace(tmp_path).new_jobs()
    assert job.clean, "the ranks agree on everything but the device"
    message = disagreement(job)
    assert message is not None
    assert "rank 0 gave a tensor on meta to a collective on group 0 (ranks [0, 1]); the rank's device is cpu" in message
    assert "rank 0: all_reduce float32[4] SUM  (trace entry 0" in message
    assert "(1 more problems in this job)" in message, "rank 1 did the same"


def test_spawned_ranks_are_traced_by_the_session(collective_trace):
    """The session fixture alone (no setting of this test's own) makes dist_helpers' ranks record."""
    collective_trace.new_jobs()  # what earlier tests left is theirs
    spawn(all_reduce_on_cpu, 2)
    [job] = collective_trace.new_jobs()
    assert [e["op"] for e in job.ranks[1].entries] == ["all_reduce"]
    assert "test_spawned_ranks_are_traced_by_the_session" in job.ranks[1].test


def all_reduce_on_cpu(rank: int, world: int) -> None:
    dist.all_reduce(torch.ones(4))


TORCHRUN_WORKER = """
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(3))
    dist.destroy_process_group()
"""


def test_torchrun_workers_are_traced(tmp_path, monkeypatch):
    """The launcher tests start torchrun; its workers inherit the trace from the environment."""
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(TORCHRUN_WORKER))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [job] = only_this_jobs_trace(tmp_path).new_jobs()
    assert job.clean and sorted(job.ranks) == [0, 1]
    assert [e["s"] for e in job.ranks[1].entries] == [["float32[3]", "SUM"]]


# Written traces: disagreements that a real gloo job would turn into a hang.

def entry(i: int, op: str, *sig, g: str = "0", m=(0, 1), d=("cpu",), **peer) -> dict:
    return {"i": i, "op": op, "g": g, "m": list(m), **peer, "s": list(sig), "d": list(d), "at": "x.py:1"}


def write_job(folder, ranks: dict[int, list[dict]], ended=(0, 1), failed: dict[int, int] | None = None):
    folder.mkdir(parents=True)
    for rank, entries in ranks.items():
        header = {"rank": rank, "world_size": len(ranks), "device": "cpu", "pid": 1, "test": "t", "argv": []}
        lines = [header, *entries, *([{"failed": (failed or {})[rank]}] if rank in (failed or {}) else []),
                 *([{"end": True}] if rank in ended else [])]
        (folder / f"rank{rank}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_job(folder)


def test_a_broadcast_against_an_all_reduce_fails(tmp_path):
    job = write_job(tmp_path / "job", {0: [entry(0, "all_reduce", "float32[4]", "SUM")],
                                       1: [entry(0, "broadcast", "float32[4]", 0)]})
    message = disagreement(job)
    assert message is not None and "ended cleanly" in message
    assert "group 0 (ranks [0, 1]), its collective 0:\n  rank 0: all_reduce float32[4] SUM  (trace entry 0, at " \
           "x.py:1)\n  rank 1: broadcast float32[4] 0  (trace entry 0, at x.py:1)" in message


def test_the_earliest_disagreement_is_the_one_named(tmp_path):
    tp = dict(g="3", m=(0, 1))
    job = write_job(tmp_path / "job", {
        0: [entry(0, "all_reduce", "float32[2]", "SUM"), entry(1, "all_reduce", "float32[8]", "SUM", **tp),
            entry(2, "barrier")],
        1: [entry(0, "all_reduce", "float32[2]", "SUM"), entry(1, "all_reduce", "float32[8]", "SUM", **tp),
            entry(2, "all_reduce", "float32[1]", "MAX")]})
    assert "its collective 1:\n  rank 0: barrier  (trace entry 2" in disagreement(job)
    job = write_job(tmp_path / "second", {
        0: [entry(0, "all_reduce", "float32[2]", "SUM", **tp), entry(1, "barrier")],
        1: [entry(0, "all_reduce", "float32[9]", "SUM", **tp), entry(1, "all_reduce", "float32[1]", "MAX")]})
    message = disagreement(job)
    assert "group 3 (ranks [0, 1]), its collective 0:" in message and "(1 more problems in this job)" in message


def test_a_missing_collective_fails_when_the_job_ended_cleanly(tmp_path):
    three = [entry(i, "all_reduce", "float32[2]", "SUM") for i in range(3)]
    message = disagreement(write_job(tmp_path / "job", {0: three, 1: three[:2]}))
    assert "group 0 (ranks [0, 1]): rank 0 made 3 collectives on it, rank 1 2; rank 0's collective 2 has no " \
           "partner on rank 1:\n  rank 0: all_reduce float32[2] SUM  (trace entry 2" in message


def test_a_killed_rank_is_compared_on_the_common_prefix_only(tmp_path):
    three = [entry(i, "all_reduce", "float32[2]", "SUM") for i in range(3)]
    assert disagreement(write_job(tmp_path / "killed", {0: three, 1: three[:2]}, ended=(0,))) is None
    # rank 0 handled the failure of its third collective (the peer was gone) and destroyed its group
    assert disagreement(write_job(tmp_path / "failed", {0: three, 1: three[:2]}, failed={0: 2})) is None
    differs = [*three[:1], entry(1, "all_reduce", "float32[3]", "SUM")]
    message = disagreement(write_job(tmp_path / "differs", {0: three, 1: differs}, ended=(0,)))
    assert "ended early" in message and "rank 1: all_reduce float32[3] SUM  (trace entry 1" in message


def test_point_to_point_messages_are_matched_pair_by_pair(tmp_path):
    send = entry(0, "send", "float32[5]", 0, to=1)
    receive = entry(0, "recv", "float32[5]", 0, **{"from": 0})
    assert disagreement(write_job(tmp_path / "matched", {0: [send], 1: [receive]})) is None
    other = entry(0, "irecv", "float32[4]", 0, **{"from": 0})
    assert "point-to-point from rank 0 to rank 1 on group 0, message 0:\n  rank 0: send float32[5] 0  (trace " \
           "entry 0, at x.py:1)\n  rank 1: irecv float32[4] 0" in disagreement(write_job(tmp_path / "shape",
                                                                                        {0: [send], 1: [other]}))
    unreceived = disagreement(write_job(tmp_path / "unreceived", {0: [send], 1: []}))
    assert "point-to-point from rank 0 to rank 1 on group 0: 1 sent, 0 received; the first without a partner:" \
           in unreceived
    assert disagreement(write_job(tmp_path / "killed", {0: [send], 1: []}, ended=(0,))) is None


def test_a_group_is_compared_among_its_members_only(tmp_path):
    """Two TP groups of a 4-rank job make different collectives; each agrees within itself."""
    first, second = dict(g="1", m=(0, 1)), dict(g="2", m=(2, 3))
    job = write_job(tmp_path / "job", {
        0: [entry(0, "all_reduce", "float32[2]", "SUM", **first)],
        1: [entry(0, "all_reduce", "float32[2]", "SUM", **first)],
        2: [entry(0, "broadcast", "float32[7]", 2, **second)],
        3: [entry(0, "broadcast", "float32[7]", 2, **second)]}, ended=(0, 1, 2, 3))
    assert disagreement(job) is None
