"""The same ops of others as Strata's, timed as Strata's are at the same shapes (../shared/gpu/peers.md):
mamba_ssm's Triton SSD and gated RMSNorm, fla's chunk_simple_gla as an SSD, Liger's fused linear
cross-entropy and RMSNorm. A peer that is not installed is a row saying so; bench/kernel_speed.py runs
them after Strata's ops (--warm-peers: each called once, to fill Triton's caches)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import types

import torch

from bench.kernel_timing import (ROWS, add_row, fwd_bwd, leaf, max_error, peak_mib, rel, run_variants, ssd_case,
                                 ssd_cost)
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref
from strata.kernels.norm.reference import rmsnorm_ref
from strata.kernels.ssd.reference import ssd_chunked_ref

# The same ops of others (../shared/gpu/peers.md): package -> the version measured, its file in
# the wheel folder that ../shared/gpu/wheels.sh fills, and each call used: (module, name,
# parameters passed by name or position). bench/gpu_suite.py --dry-run checks every call against
# the peer's sources in that folder.
PEERS = {
    "mamba_ssm": dict(version="2.3.2.post1", dist="mamba_ssm-2.3.2.post1.tar.gz", calls=[
        ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
         ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "dt_softplus")),
        ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn",
         ("x", "weight", "bias", "z", "eps", "group_size", "norm_before_gate"))]),
    "fla": dict(version="0.6.0", dist="fla_core-0.6.0-py3-none-any.whl", calls=[
        ("fla.ops.simple_gla.chunk", "chunk_simple_gla", ("q", "k", "v", "g", "scale"))]),
    "liger_kernel": dict(version="0.8.5", dist="liger_kernel-0.8.5-py3-none-any.whl", calls=[
        ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss.__init__",
         ("ignore_index",)),
        ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss.forward",
         ("lin_weight", "_input", "target")),
        ("liger_kernel.transformers.rms_norm", "LigerRMSNorm.__init__",
         ("hidden_size", "eps", "casting_mode", "in_place")),
        ("liger_kernel.transformers.rms_norm", "LigerRMSNorm.forward", ("hidden_states",))]),
}


def enter_mamba_ssm() -> None:
    """mamba_ssm's package __init__ imports its CUDA extension (selective_scan_cuda), its Mamba3
    modules (which call triton.set_allocator at import) and its models (transformers' generation
    classes); its Triton SSD and gated norm need none of that. So the package is entered without
    running __init__, and peers.md's stub of selective_scan_cuda is set for anything that asks."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec  # its loader never runs: the module is in sys.modules already
        package.__version__ = PEERS["mamba_ssm"]["version"]
        sys.modules["mamba_ssm"] = package


ONLY_PEERS: set[str] = set()
"""--only-peers: the packages to run (empty: all)."""


def peer(package: str, module: str, name: str):
    """(the peer's function or class, '') or (None, why not: 'not installed' or 'import failed: ...')."""
    if ONLY_PEERS and package not in ONLY_PEERS:
        return None, "left out (--only-peers)"
    if package not in sys.modules and importlib.util.find_spec(package) is None:
        return None, "not installed"
    try:
        if package == "mamba_ssm":
            enter_mamba_ssm()
        return getattr(importlib.import_module(module), name.split(".")[0]), ""
    except Exception as e:  # noqa: BLE001 (a broken peer is a row, not the end of the run)
        return None, f"import failed: {type(e).__name__}: {str(e)[:70]}"


def peer_label(package: str) -> str:
    return f"{package} {PEERS[package]['version']}"


def strata_ms(op: str, mode: str) -> float | None:
    return next((r["ms"] for r in ROWS if r["op"] == op and r["mode"] == mode and r["impl"] == "triton"), None)


def vs_strata(op: str, mode: str, ms: float) -> str:
    mine = strata_ms(op, mode)
    if mine is None or not ms == ms:  # nan: the peer failed
        return ""
    return f"Strata {ms / mine:.2f}x faster" if ms >= mine else f"Strata {mine / ms:.2f}x slower"


def run_peer(op, label, fn, inputs, nbytes_fwd, nbytes_bwd, flops_fwd, flops_bwd, err, note="",
             modes=("fwd", "fwd+bwd"), memory=False):
    """Time a peer's forward (no grad) and forward + backward as Strata's rows are timed; with memory,
    also its peak memory beyond the inputs (forward + backward, gradients included)."""
    det = [t.detach() for t in inputs]
    tin = [leaf(t) for t in inputs]
    for mode in modes:
        notes = []
        if mode == "fwd":
            with torch.no_grad():
                run_variants(op, mode, [(label, lambda: fn(*det))], nbytes_fwd, flops_fwd, err)
        else:
            step = fwd_bwd(fn, tin)
            if memory:
                step()  # fixes the output gradient outside the measurement
                for t in tin:
                    t.grad = None
                mem = peak_mib(step)
                notes.append(f"peak mem {mem:.0f} MiB")
                for t in tin:
                    t.grad = None
            run_variants(op, mode, [(label, step)], nbytes_fwd + nbytes_bwd, flops_fwd + flops_bwd, err,
                         grad_to_none=tin)
        row = ROWS[-1]
        row["err"] = err
        if memory and mode != "fwd":
            row["mem_mib"] = mem
        row["note"] = "; ".join(x for x in (row["note"], *notes, vs_strata(op, mode, row["ms"]), note) if x)
        torch.cuda.synchronize()


def missing_peer(op, label, why):
    if not why.startswith("left out"):
        add_row(op, "-", label, float("nan"), 0, 0, note=why)


def peer_ssd(args, warm=False):
    inputs, dims = ssd_case(args)
    b, l, h, p, g, n, L = dims
    fb, bb, ff, bf = ssd_cost(dims)
    y_ref, g_ref, gy = None, None, torch.randn(inputs[0].shape, device="cuda")
    if not warm:  # the fp32 reference on the same inputs, for the bf16 errors
        ref_in = [leaf(t, torch.float32) for t in inputs]
        y_ref = ssd_chunked_ref(*ref_in[:5], L, D=ref_in[5], dt_bias=ref_in[6], dt_softplus=True)
        g_ref = torch.autograd.grad(y_ref, ref_in, gy)
    mamba, why = peer("mamba_ssm", *PEERS["mamba_ssm"]["calls"][0][:2])
    if mamba is None:
        missing_peer("ssd", peer_label("mamba_ssm"), why)
    else:
        def mamba_ssd(x, dt, A, B, C, D, dt_bias):
            return mamba(x, dt, A, B, C, L, D=D, z=None, dt_bias=dt_bias, dt_softplus=True)
        _peer_ssd_rows("mamba_ssm", mamba_ssd, inputs, y_ref, gy, g_ref, (fb, bb, ff, bf), warm,
                       "Triton SSD, mamba_chunk_scan_combined")
    gla, why = peer("fla", *PEERS["fla"]["calls"][0][:2])
    if gla is None:
        missing_peer("ssd", peer_label("fla"), why)
    else:
        def fla_ssd(x, dt, A, B, C, D, dt_bias):
            heads, groups = x.shape[2], B.shape[2]
            dt = torch.nn.functional.softplus(dt.float() + dt_bias)
            q = C.repeat_interleave(heads // groups, dim=2)
            k = B.repeat_interleave(heads // groups, dim=2)
            v = (x * dt.unsqueeze(-1)).to(x.dtype)
            o, _ = gla(q, k, v, g=dt * A, scale=1.0)
            return o + x * D[:, None].to(x.dtype)
        _peer_ssd_rows("fla", fla_ssd, inputs, y_ref, gy, g_ref, (fb, bb, ff, bf), warm,
                       "chunk_simple_gla per head; softplus, B/C to heads, D skip in PyTorch")


def _peer_ssd_rows(package, fn, inputs, y_ref, gy, g_ref, cost, warm, note):
    tin = [leaf(t) for t in inputs]
    y = fn(*tin)
    grads = torch.autograd.grad(y, tin, gy.to(y.dtype), allow_unused=True)
    if warm:
        return
    errs = [rel(y, y_ref)] + [rel(a, r) for a, r in zip(grads, g_ref) if a is not None]
    fb, bb, ff, bf = cost
    run_peer("ssd", peer_label(package), fn, inputs, fb, bb, ff, bf, max(errs),
             note=f"{note}; out err {errs[0]:.1e}")


def peer_norm(args, warm=False):
    rows = args.batch * args.seqlen
    d = args.d_model
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda") + 0.5
    liger_norm, why = peer("liger_kernel", *PEERS["liger_kernel"]["calls"][2][:2])
    if liger_norm is None:
        missing_peer("rmsnorm", peer_label("liger_kernel"), why)
    else:
        module = liger_norm(d, eps=1e-5, casting_mode="llama", in_place=False).cuda()

        def liger(x, w):
            return torch.func.functional_call(module, {"weight": w}, (x,))
        _peer_rows("rmsnorm", "liger_kernel", liger, [x, w], lambda x, w: rmsnorm_ref(x, w, 1e-5), rows * d * 2,
                   warm, (2, 3), "LigerRMSNorm, casting_mode llama, in_place off (each timed backward keeps its "
                                 "output gradient)")
    d = 2 * args.d_model
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda") + 0.5
    gated, why = peer("mamba_ssm", *PEERS["mamba_ssm"]["calls"][1][:2])
    if gated is None:
        missing_peer("rmsnorm gated", peer_label("mamba_ssm"), why)
    else:
        def mamba_norm(x, w, z):
            return gated(x, w, None, z=z, eps=1e-5, group_size=None, norm_before_gate=False)
        _peer_rows("rmsnorm gated", "mamba_ssm", mamba_norm, [x, w, z],
                   lambda x, w, z: rmsnorm_ref(x, w, 1e-5, z, None), rows * d * 2, warm, (3, 5),
                   "rmsnorm_fn, norm_before_gate=False (Mamba2's)")


def _peer_rows(op, package, fn, inputs, ref, e, warm, passes, note):
    if warm:
        tin = [leaf(t) for t in inputs]
        y = fn(*tin)
        torch.autograd.grad(y, tin, torch.randn_like(y))
        return
    err = max_error(inputs, fn, ref)
    run_peer(op, peer_label(package), fn, inputs, e * passes[0], e * passes[1], 0, 0, err, note=note)


def peer_ce(args, warm=False):
    n, d, V = args.batch * args.seqlen, args.d_model, args.vocab
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, d, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda")
    t[::50] = -100
    loss_class, why = peer("liger_kernel", *PEERS["liger_kernel"]["calls"][1][:2])
    if loss_class is None:
        missing_peer("linear CE", peer_label("liger_kernel"), why)
        return
    loss_fn = loss_class(ignore_index=-100)

    def liger(h, w):
        return loss_fn(w, h, t)
    if warm:
        tin = [leaf(h), leaf(w)]
        torch.autograd.grad(liger(*tin), tin)
        return
    err = max_error([h, w], liger, lambda a, b: linear_cross_entropy_ref(a, b, t))
    flops, nbytes = 2 * n * V * d, 2 * (n * d + V * d)
    run_peer("linear CE", peer_label("liger_kernel"), liger, [h, w], nbytes, nbytes, flops, 2 * flops, err,
             modes=("fwd+bwd",), memory=True,
             note="LigerFusedLinearCrossEntropyLoss, defaults (its grad_weight accumulates in the input dtype)")


PEER_BENCHES = {"ssd": peer_ssd, "norm": peer_norm, "ce": peer_ce}


def bench_peers(args, ops, warm=False):
    for op in ops:
        if op not in PEER_BENCHES:
            continue
        t0 = time.time()
        try:
            PEER_BENCHES[op](args, warm)
        except Exception as e:  # noqa: BLE001 (report and go on)
            import traceback
            traceback.print_exc()
            add_row(op, "-", "peers", float("nan"), 0, 0, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
        print(f"[{op} peers {'warmed' if warm else 'done'} in {time.time() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()

