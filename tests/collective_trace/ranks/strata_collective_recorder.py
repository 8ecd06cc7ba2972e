"""The recording half of the collective trace (tests/collective_trace/__init__.py says what the trace is for
and how the tests use it). This module runs inside every rank a test starts: its folder is on the ranks'
PYTHONPATH, so Python imports the sitecustomize beside it at start-up, which calls `install_when_enabled`.
It imports nothing of Strata and nothing outside the standard library until torch.distributed is imported.

Where the wrapping happens: torch.distributed.distributed_c10d's functions, replaced the moment that module
has run, before `torch.distributed` copies them into its own namespace and before anything else can take a
reference (megatron-core's `dist_all_gather_func = torch.distributed.all_gather_into_tensor`, DeepSpeed's
`TorchBackend.all_gather_function`, a `from torch.distributed import ...`). DeepSpeed's `deepspeed.comm`
calls `torch.distributed.<op>` (or the references above) on every call, so every collective of Strata,
megatron-core and DeepSpeed passes through a wrapper. A collective that torch implements with another one
(all_gather_object gathers sizes, then bytes) is recorded once, as the call the program made.

The file of a rank: <trace dir>/<job id>/rank<R>.jsonl, one JSON object a line, written unbuffered
(os.write) so that a rank killed with SIGKILL or leaving through os._exit keeps every line it wrote:
  {"rank", "world_size", "device", "pid", "test", "argv"}   the header, written by init_process_group
  {"i", "op", "g", "m", "s", "d", "at"}                      a collective, written before it runs
  {"i", "op", "g", "m", "to" | "from", "s", "d", "at"}       a point-to-point send or receive
  {"failed": i}                                              collective i raised (gloo's errors)
  {"end": true}                                              the default group was destroyed
i: the entry's index in the rank's file; op: the function's name; g: the group's name (torch numbers the
groups in the order all ranks created them, so one group has one name on every member); m: the group's
global ranks; s: what must agree across the members (dtypes and shapes, reduce op, root); d: the devices of
the tensors; at: the first caller outside torch and deepspeed.comm; to/from: the peer's global rank.
The job id is made by rank 0 and read by the others through the job's own store, so every rank of one job
writes into one folder, and a job restarted in place (torchrun --max-restarts) or a second job in the same
test gets another one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import inspect
import json
import os
import sys
import threading
import uuid

TRACE_ENV = "STRATA_TEST_COLLECTIVE_TRACE"
C10D = "torch.distributed.distributed_c10d"
JOB_KEY = "strata_test_collective_trace_job"


class Recorder:
    """The trace of one process: the open file, the running index, the nesting depth per thread."""

    def __init__(self, root: str):
        self.root = root
        self.fd: int | None = None
        self.index = 0
        self.inits = 0
        self.local = threading.local()
        self.skip_prefixes: tuple[str, ...] = ()
        self.where_cache: dict[str, str] = {}

    def write(self, entry: dict) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def record(self, entry: dict) -> int:
        """Write a call's entry with its index and caller; the index, for a later failure mark."""
        index = self.index
        self.index += 1
        self.write({"i": index, **entry, "at": self.caller()})
        return index

    def inside(self) -> bool:
        """Whether this thread is already inside a recorded call (torch's own nested collectives are not the
        program's)."""
        return getattr(self.local, "depth", 0) > 0

    @contextlib.contextmanager
    def outermost(self):
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            yield
        finally:
            self.local.depth -= 1

    def open_job(self, c10d) -> None:
        """After init_process_group: agree on the job's folder with the other ranks, write the header."""
        self.inits += 1
        rank, world_size = c10d.get_rank(), c10d.get_world_size()
        job = agreed_job_id(c10d, rank, world_size, f"{JOB_KEY}_{self.inits}")
        folder = os.path.join(self.root, job)
        os.makedirs(folder, exist_ok=True)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = os.open(os.path.join(folder, f"rank{rank}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.index = 0
        self.write({"rank": rank, "world_size": world_size, "device": rank_device(c10d), "pid": os.getpid(),
                    "test": os.environ.get("PYTEST_CURRENT_TEST", ""), "argv": sys.argv[:4]})

    def caller(self) -> str:
        """file:line of the first frame outside torch, deepspeed.comm and this module: the code that asked for
        the collective."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(self.skip_prefixes):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{self.short_path(frame.f_code.co_filename)}:{frame.f_lineno}"

    def short_path(self, filename: str) -> str:
        short = self.where_cache.get(filename)
        if short is None:
            short = filename.split("site-packages/")[-1]
            if short == filename and filename.startswith(os.getcwd() + os.sep):
                short = os.path.relpath(filename)
            self.where_cache[filename] = short
        return short


def agreed_job_id(c10d, rank: int, world_size: int, key: str) -> str:
    """Rank 0 names the job; the others wait for the name in the job's store (no collective: the trace must
    not add entries of its own)."""
    if world_size == 1:
        return uuid.uuid4().hex[:12]
    store = c10d._get_default_store()
    if rank == 0:
        store.set(key, uuid.uuid4().hex[:12])
    return store.get(key).decode()


def rank_device(c10d) -> str:
    """The device a rank's collectives must use: its GPU under NCCL, the CPU under gloo (Strata's layout:
    parallel/distributed.py picks nccl exactly when the rank has a GPU)."""
    if "nccl" in str(c10d.get_backend()):
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


# What must agree across a group's members, per collective: functions of the bound arguments (a dict holding
# what the caller passed) and the group. A list or tensor argument that differs legitimately between ranks
# (the gather list, present on the root only; objects; all_to_all's uneven splits) is left out.

def tensor_sig(t) -> str:
    """dtype and shape, dimensions of size 1 left out: DeepSpeed's pipeline broadcasts its loss from a 0-d tensor
    into a [1] one on the other stages (runtime/pipe/engine.py _bcast_pipe_scalar), the same element in every
    backend; a real disagreement changes the element count or the layout of the dimensions that hold data."""
    return f"{str(t.dtype).removeprefix('torch.')}{[d for d in t.shape if d != 1]}"


def tensors_sig(ts) -> list[str]:
    return [tensor_sig(t) for t in ts]


def root(c10d, group, args: dict, global_name: str, group_name: str):
    if args.get(group_name) is not None:
        return c10d.get_global_rank(group, args[group_name])
    return args.get(global_name)


def reduce_op(args: dict) -> str:
    return str(args.get("op", "SUM")).rsplit(".", 1)[-1]


def all_to_all_single_sig(args: dict) -> list:
    # Uneven splits give the ranks different first dimensions; the rest of the shape and the dtype must agree.
    if args.get("output_split_sizes") is None and args.get("input_split_sizes") is None:
        return tensors_sig([args["output"], args["input"]])
    return [f"{str(t.dtype).removeprefix('torch.')}[*, {', '.join(map(str, t.shape[1:]))}]"
            for t in (args["output"], args["input"])]


COLLECTIVES = {
    "all_reduce": lambda c10d, g, a: [tensor_sig(a["tensor"]), reduce_op(a)],
    "all_reduce_coalesced": lambda c10d, g, a: [tensors_sig(a["tensors"]), reduce_op(a)],
    "reduce": lambda c10d, g, a: [tensor_sig(a["tensor"]), reduce_op(a), root(c10d, g, a, "dst", "group_dst")],
    "broadcast": lambda c10d, g, a: [tensor_sig(a["tensor"]), root(c10d, g, a, "src", "group_src")],
    "all_gather": lambda c10d, g, a: [tensors_sig(a["tensor_list"]), tensor_sig(a["tensor"])],
    "all_gather_into_tensor": lambda c10d, g, a: tensors_sig([a["output_tensor"], a["input_tensor"]]),
    "_all_gather_base": lambda c10d, g, a: tensors_sig([a["output_tensor"], a["input_tensor"]]),
    "all_gather_coalesced": lambda c10d, g, a: [[tensors_sig(ts) for ts in a["output_tensor_lists"]],
                                                tensors_sig(a["input_tensor_list"])],
    "reduce_scatter": lambda c10d, g, a: [tensor_sig(a["output"]), tensors_sig(a["input_list"]), reduce_op(a)],
    "reduce_scatter_tensor": lambda c10d, g, a: [*tensors_sig([a["output"], a["input"]]), reduce_op(a)],
    "_reduce_scatter_base": lambda c10d, g, a: [*tensors_sig([a["output"], a["input"]]), reduce_op(a)],
    "all_to_all": lambda c10d, g, a: [len(a["output_tensor_list"]), len(a["input_tensor_list"]),
                                      sorted({str(t.dtype) for t in a["input_tensor_list"]})],
    "all_to_all_single": lambda c10d, g, a: all_to_all_single_sig(a),
    "barrier": lambda c10d, g, a: [],
    "monitored_barrier": lambda c10d, g, a: [],
    "all_gather_object": lambda c10d, g, a: [len(a["object_list"])],
    "broadcast_object_list": lambda c10d, g, a: [len(a["object_list"]), root(c10d, g, a, "src", "group_src")],
    "gather_object": lambda c10d, g, a: [root(c10d, g, a, "dst", "group_dst")],
    "scatter_object_list": lambda c10d, g, a: [len(a["scatter_object_output_list"]),
                                               root(c10d, g, a, "src", "group_src")],
    "gather": lambda c10d, g, a: [tensor_sig(a["tensor"]), root(c10d, g, a, "dst", "group_dst")],
    "scatter": lambda c10d, g, a: [tensor_sig(a["tensor"]), root(c10d, g, a, "src", "group_src")],
}

# Point-to-point: (direction, the peer's global-rank and group-rank argument names, what must agree with the
# other side's call). A receive from any source (src None) has no peer to match and is recorded with "from": null.
POINT_TO_POINT = {
    "send": ("to", "dst", "group_dst", lambda a: [tensor_sig(a["tensor"]), a.get("tag", 0)]),
    "isend": ("to", "dst", "group_dst", lambda a: [tensor_sig(a["tensor"]), a.get("tag", 0)]),
    "recv": ("from", "src", "group_src", lambda a: [tensor_sig(a["tensor"]), a.get("tag", 0)]),
    "irecv": ("from", "src", "group_src", lambda a: [tensor_sig(a["tensor"]), a.get("tag", 0)]),
    "send_object_list": ("to", "dst", "group_dst", lambda a: ["objects", len(a["object_list"])]),
    "recv_object_list": ("from", "src", "group_src", lambda a: ["objects", len(a["object_list"])]),
}


def tensor_devices(args: dict) -> list[str]:
    devices = set()
    for value in args.values():
        if hasattr(value, "device") and hasattr(value, "shape"):
            devices.add(str(value.device))
        elif isinstance(value, (list, tuple)):
            devices.update(str(v.device) for v in value if hasattr(v, "device") and hasattr(v, "shape"))
    return sorted(devices)


def group_of(c10d, args: dict):
    group = args.get("group")
    return c10d._get_default_group() if group is None else group


def describe(c10d, name: str, args: dict) -> dict | None:
    """The entry for one call, or None when this rank is not in the group (torch makes the call a no-op)."""
    group = group_of(c10d, args)
    if c10d._rank_not_in_group(group):
        return None
    entry = {"op": name, "g": group.group_name, "m": c10d.get_process_group_ranks(group)}
    if name in POINT_TO_POINT:
        direction, global_arg, group_arg, signature = POINT_TO_POINT[name]
        entry[direction] = root(c10d, group, args, global_arg, group_arg)
        entry["s"] = signature(args)
    else:
        entry["s"] = COLLECTIVES[name](c10d, group, args)
    entry["d"] = tensor_devices(args)
    return entry


def traced(recorder: Recorder, c10d, name: str, function):
    """function, recording each outermost call before it runs (a hang or a gloo error still leaves the entry)."""
    signature = inspect.signature(function)

    def wrapper(*args, **kwargs):
        if recorder.inside() or recorder.fd is None:
            return function(*args, **kwargs)
        entry = describe(c10d, name, signature.bind(*args, **kwargs).arguments)
        if entry is None:
            return function(*args, **kwargs)
        index = recorder.record(entry)
        with recorder.outermost():
            try:
                return function(*args, **kwargs)
            except Exception:
                recorder.write({"failed": index})
                raise

    return functools.wraps(function)(wrapper)


def traced_new_group(recorder: Recorder, c10d, function):
    """new_group is entered by every rank of the job in the same order (torch's rule, unless
    use_local_synchronization): recorded on the default group with the new group's members, which also checks
    that the groups' names (their creation order) mean the same group on every rank."""
    signature = inspect.signature(function)

    def new_group(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        if not (recorder.inside() or recorder.fd is None or arguments.get("use_local_synchronization")):
            world = c10d._get_default_group()
            ranks = arguments.get("ranks")
            recorder.record({"op": "new_group", "g": world.group_name, "m": c10d.get_process_group_ranks(world),
                             "s": [sorted(ranks) if ranks is not None else None], "d": []})
        with recorder.outermost():
            return function(*args, **kwargs)

    return functools.wraps(function)(new_group)


def traced_init(recorder: Recorder, c10d, function):
    def init_process_group(*args, **kwargs):
        result = function(*args, **kwargs)
        recorder.open_job(c10d)
        return result

    return functools.wraps(function)(init_process_group)


def traced_destroy(recorder: Recorder, c10d, function):
    """The end mark: the rank destroyed its default group (it reached the end of its job, or of a failure that
    it handled: a job is complete only when no rank marked a collective as failed either)."""
    signature = inspect.signature(function)

    def destroy_process_group(*args, **kwargs):
        group = signature.bind(*args, **kwargs).arguments.get("group")
        if group is None or group is c10d.GroupMember.WORLD:
            recorder.write({"end": True})
        return function(*args, **kwargs)

    return functools.wraps(function)(destroy_process_group)


def patch(c10d, recorder: Recorder) -> None:
    """Replace the functions in distributed_c10d (and in torch.distributed, when that already copied them)."""
    torch_dir = os.path.dirname(os.path.dirname(c10d.__file__))
    deepspeed_comm = os.path.join(os.path.dirname(torch_dir), "deepspeed", "comm")
    recorder.skip_prefixes = (torch_dir + os.sep, deepspeed_comm + os.sep, __file__)
    replacements = {name: traced(recorder, c10d, name, getattr(c10d, name))
                    for name in (*COLLECTIVES, *POINT_TO_POINT) if hasattr(c10d, name)}
    replacements["new_group"] = traced_new_group(recorder, c10d, c10d.new_group)
    replacements["init_process_group"] = traced_init(recorder, c10d, c10d.init_process_group)
    replacements["destroy_process_group"] = traced_destroy(recorder, c10d, c10d.destroy_process_group)
    package = sys.modules.get("torch.distributed")
    for name, wrapper in replacements.items():
        original = getattr(c10d, name)
        setattr(c10d, name, wrapper)
        if package is not None and getattr(package, name, None) is original:
            setattr(package, name, wrapper)


class PatchOnImport:
    """A meta-path finder that lets distributed_c10d load as usual, then patches it before anyone imports
    a name from it. Removed from sys.meta_path once it has done so."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def find_spec(self, name, path, target=None):
        if name != C10D:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module, self.recorder)
            sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module
        return spec


def install_when_enabled() -> None:
    root = os.environ.get(TRACE_ENV)
    if not root:
        return
    recorder = Recorder(root)
    if C10D in sys.modules:
        patch(sys.modules[C10D], recorder)
    else:
        sys.meta_path.insert(0, PatchOnImport(recorder))
