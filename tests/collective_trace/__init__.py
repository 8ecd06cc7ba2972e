"""The collective trace: every rank of every multi-process test records the collectives it enters, and after
the test the ranks' records are compared. A rank that disagrees with the others (another collective, another
shape or dtype, another root, a send without its receive) fails the test at teardown with the first
disagreement; so does a tensor handed to a collective on another device than the rank's.

How it is switched on, without a hook in the product code: tests/conftest.py (an autouse session fixture) sets
STRATA_TEST_COLLECTIVE_TRACE to a folder of the session and puts tests/collective_trace/ranks on PYTHONPATH, so
every process a test starts (dist_helpers.spawn's ranks, torchrun's and the deepspeed launcher's workers,
`strata train`, a test's own mp.spawn or Popen) imports that folder's sitecustomize at start-up, which wraps
torch.distributed's functions as soon as torch.distributed is imported (ranks/strata_collective_recorder.py:
what is wrapped, why there, the file format). The pytest process itself is not traced. After each test, an
autouse fixture reads the jobs that appeared since the last test and fails the test naming the first problem.

What is compared, per job (the ranks that shared one process group; each job has its own folder):
- each group's collectives, by position: the n-th collective every member made on a group has the same
  function, dtypes, shapes, reduce op and root (the arguments that differ between ranks by design, such as
  the objects of all_gather_object or the gather list on the root only, are not recorded);
- each pair of ranks' point-to-point traffic: the n-th send (or isend, or send_object_list) from rank a to
  rank b matches the n-th receive on b from a, in dtype, shape and tag; a receive from any source is not
  matched;
- every tensor given to a collective is on the rank's device (the CPU under gloo, its GPU under NCCL).
- When the job ended cleanly (every rank destroyed its process group and no collective raised), also the
  number of collectives per group and of messages per pair: a rank that made one more is a disagreement.

Jobs that end early on purpose (a rank killed with SIGKILL, a torchrun worker failure, preemption that kills
a rank, a test that makes one rank raise) leave some ranks' traces incomplete, and the ranks that survive
such a failure see their collectives fail: for those jobs only the common prefix is compared, i.e. what
every rank recorded at each position, and the counts are not. A preempted job whose ranks all agreed to stop
and saved ends cleanly and is compared in full.

The check costs little: a record is a JSON line per collective, written before the collective runs (so a
hang or a gloo error still leaves it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tests.collective_trace.ranks.strata_collective_recorder import TRACE_ENV

RANKS_DIR = Path(__file__).resolve().parent / "ranks"


def environment(trace_dir: Path, environ: dict) -> dict[str, str]:
    """The variables that make the processes started with them record into trace_dir."""
    path = os.pathsep.join(filter(None, [str(RANKS_DIR), environ.get("PYTHONPATH")]))
    return {TRACE_ENV: str(trace_dir), "PYTHONPATH": path}


@dataclass
class RankTrace:
    rank: int
    world_size: int
    device: str
    test: str
    argv: list
    entries: list[dict] = field(default_factory=list)
    ended: bool = False
    failed: bool = False


def read_rank(path: Path) -> RankTrace | None:
    """A rank's trace; None for a file without its header yet. A rank killed in the middle of a write leaves a
    partial last line, which is skipped."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    if not lines:
        return None
    header, records = lines[0], lines[1:]
    trace = RankTrace(header["rank"], header["world_size"], header["device"], header["test"], header["argv"])
    for record in records:
        if "i" in record:
            trace.entries.append(record)
        trace.ended = record.get("end", trace.ended)
        trace.failed = trace.failed or "failed" in record
    return trace


@dataclass
class Job:
    folder: Path
    ranks: dict[int, RankTrace]

    @property
    def world_size(self) -> int:
        return next(iter(self.ranks.values())).world_size

    @property
    def clean(self) -> bool:
        """Every rank wrote a trace, destroyed its process group, and saw no collective fail."""
        return (len(self.ranks) == self.world_size
                and all(t.ended and not t.failed for t in self.ranks.values()))

    def trace(self, rank: int) -> RankTrace | None:
        return self.ranks.get(rank)

    def started_by(self) -> str:
        some = self.ranks[min(self.ranks)]
        return f"{some.test or 'no test'}: {' '.join(some.argv)}"


def read_job(folder: Path) -> Job:
    traces = filter(None, map(read_rank, sorted(folder.glob("rank*.jsonl"))))
    return Job(folder, {t.rank: t for t in traces})


@dataclass(order=True)
class Problem:
    order: int  # the earliest trace entry involved, so that the first disagreement is reported first
    message: str


def show(entry: dict) -> str:
    fields = " ".join(json.dumps(f) if not isinstance(f, str) else f for f in entry["s"])
    return f"{entry['op']} {fields}".rstrip() + f"  (trace entry {entry['i']}, at {entry['at']})"


def group_label(key: tuple) -> str:
    name, members = key
    return f"group {name} (ranks {list(members)})"


def per_group(job: Job) -> dict[tuple, dict[int, list[dict]]]:
    """(group name, members) -> member rank -> its collectives on that group, in order."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for rank, trace in job.ranks.items():
        for entry in trace.entries:
            if "to" not in entry and "from" not in entry:
                groups.setdefault((entry["g"], tuple(entry["m"])), {}).setdefault(rank, []).append(entry)
    return groups


def group_problems(job: Job) -> list[Problem]:
    problems = []
    for key, by_rank in per_group(job).items():
        sequences = {rank: by_rank.get(rank, []) for rank in key[1]}
        problem = first_difference(key, sequences) or (count_difference(key, sequences) if job.clean else None)
        if problem:
            problems.append(problem)
    return problems


def first_difference(key: tuple, sequences: dict[int, list[dict]]) -> Problem | None:
    """The first position where two members that both reached it recorded different collectives."""
    for position in range(max(map(len, sequences.values()))):
        present = [(rank, seq[position]) for rank, seq in sequences.items() if position < len(seq)]
        first_rank, first = present[0]
        for rank, entry in present[1:]:
            if (entry["op"], entry["s"]) != (first["op"], first["s"]):
                return Problem(min(first["i"], entry["i"]),
                               f"{group_label(key)}, its collective {position}:\n"
                               f"  rank {first_rank}: {show(first)}\n  rank {rank}: {show(entry)}")
    return None


def count_difference(key: tuple, sequences: dict[int, list[dict]]) -> Problem | None:
    counts = {rank: len(seq) for rank, seq in sequences.items()}
    if len(set(counts.values())) <= 1:
        return None
    fewest, most = min(counts, key=counts.get), max(counts, key=counts.get)
    extra = sequences[most][counts[fewest]]
    return Problem(extra["i"], f"{group_label(key)}: rank {most} made {counts[most]} collectives on it, rank "
                               f"{fewest} {counts[fewest]}; rank {most}'s collective {counts[fewest]} has no "
                               f"partner on rank {fewest}:\n  rank {most}: {show(extra)}")


def point_to_point_problems(job: Job) -> list[Problem]:
    sends: dict[tuple, list[dict]] = {}
    receives: dict[tuple, list[dict]] = {}
    for rank, trace in job.ranks.items():
        for entry in trace.entries:
            if "to" in entry:
                sends.setdefault((entry["g"], rank, entry["to"]), []).append(entry)
            elif entry.get("from") is not None:
                receives.setdefault((entry["g"], entry["from"], rank), []).append(entry)
    problems = []
    for channel in sorted(set(sends) | set(receives)):
        problem = channel_problem(channel, sends.get(channel, []), receives.get(channel, []), job.clean)
        if problem:
            problems.append(problem)
    return problems


def channel_problem(channel: tuple, sent: list[dict], received: list[dict], clean: bool) -> Problem | None:
    group, source, target = channel
    label = f"point-to-point from rank {source} to rank {target} on group {group}"
    for position, (send, receive) in enumerate(zip(sent, received)):
        if send["s"] != receive["s"]:
            return Problem(min(send["i"], receive["i"]), f"{label}, message {position}:\n"
                                                         f"  rank {source}: {show(send)}\n"
                                                         f"  rank {target}: {show(receive)}")
    if clean and len(sent) != len(received):
        longer, rank = (sent, source) if len(sent) > len(received) else (received, target)
        extra = longer[min(len(sent), len(received))]
        return Problem(extra["i"], f"{label}: {len(sent)} sent, {len(received)} received; the first without "
                                   f"a partner:\n  rank {rank}: {show(extra)}")
    return None


def device_problems(job: Job) -> list[Problem]:
    problems = []
    for rank, trace in job.ranks.items():
        for entry in trace.entries:
            elsewhere = [d for d in entry["d"] if d != trace.device]
            if elsewhere:
                problems.append(Problem(entry["i"], f"rank {rank} gave a tensor on {', '.join(elsewhere)} to a "
                                                    f"collective on {group_label((entry['g'], entry['m']))}; the "
                                                    f"rank's device is {trace.device}:\n  rank {rank}: {show(entry)}"))
                break
    return problems


def job_problems(job: Job) -> list[Problem]:
    return sorted(group_problems(job) + point_to_point_problems(job) + device_problems(job))


def disagreement(job: Job) -> str | None:
    """The first problem of a job, said in full, with how many more there are; None when the ranks agree."""
    problems = job_problems(job)
    if not problems:
        return None
    more = f"\n({len(problems) - 1} more problems in this job)" if len(problems) > 1 else ""
    state = "ended cleanly" if job.clean else "ended early (a killed or failed rank): common prefixes compared"
    return (f"collective trace: the ranks of a job disagree (job {job.folder}, {job.world_size} ranks, {state}; "
            f"started by {job.started_by()}):\n{problems[0].message}{more}")


class TraceRoot:
    """A folder of jobs' traces, checked once each: after every test, the jobs that appeared since."""

    def __init__(self, root: Path):
        self.root = root
        self.checked: set[str] = set()

    def new_jobs(self) -> list[Job]:
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in self.checked)
        self.checked.update(p.name for p in folders)
        return [job for job in map(read_job, folders) if job.ranks]

    def disagreements(self) -> list[str]:
        return [message for message in map(disagreement, self.new_jobs()) if message]
