"""Kernel benchmarks on one GPU: each Triton op against its PyTorch reference and against
torch.compile of that reference, with bf16 correctness against an fp32 reference.

    python bench/kernel_speed.py                 # every op, the shapes of the 1.3B hybrid
    python bench/kernel_speed.py --ops ssd,norm --no-compile
    python bench/kernel_speed.py --sweep         # also try SSD block-size variants first
    python bench/kernel_speed.py --ops ssd,norm,ce --no-compile --json out.json   # + the peers, as bench/gpu_suite.py

Beside Strata's kernels, the same ops of others at the same shapes (../shared/gpu/peers.md; off
with --no-peers): mamba_ssm's Triton SSD (mamba_chunk_scan_combined) and gated RMSNorm
(rmsnorm_fn), fla's chunk_simple_gla as an SSD (per head: q = C, k = B, v = x dt, g = A dt, the
dt softplus, the B/C expansion to heads and the D skip in PyTorch, inside the timing), and
Liger's fused linear cross-entropy and RMSNorm. A peer that is not installed is a row saying so.
They run after Strata's ops, in this process; --warm-peers only calls each once (filling
Triton's compile cache, e.g. in a process beside other work) and exits without a table. Strata's
ops are timed here, the peers in bench/kernel_peers.py, both through bench/kernel_timing.py.

Prints one table: median time (triton.testing.do_bench), achieved GB/s over the op's
minimum bytes (each input read once, each output written once) and TFLOP/s, both as a
share of the peaks given by --hbm-tbs / --peak-tflops (H100 SXM as measured here:
about 3.0 TB/s and 800 TFLOP/s bf16), speed-up over the reference, and the largest
relative error (norm of the difference over norm of the reference) of the bf16 Triton
output and gradients against the reference run in fp32 on the same inputs. For the
fused linear cross-entropy it also prints the peak memory of the fused and naive
versions beyond their inputs. Needs CUDA; records nothing itself: copy the table
into docs/BENCHMARKS.md with the date, machine and command.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path, where a bench module would stand in for a top-level
# package of its name: the repo root instead, for bench.kernel_timing and bench.kernel_peers.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO / "bench", REPO)]

from bench.kernel_peers import ONLY_PEERS, bench_peers  # noqa: E402
from bench.kernel_timing import (ROWS, add_row, bench, compiled, fwd_bwd, leaf, max_error, peak_mib,  # noqa: E402
                                 print_table, rel, run_variants, ssd_case, ssd_cost, sweep_knob, write_json)
from strata.kernels.blockdiag.reference import blockdiag_matmul_ref  # noqa: E402
from strata.kernels.conv.reference import causal_conv1d_ref  # noqa: E402
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref  # noqa: E402
from strata.kernels.norm.reference import rmsnorm_ref  # noqa: E402
from strata.kernels.ssd.reference import ssd_chunked_ref  # noqa: E402


# ----------------------------------------------------------------------------- SSD

def bench_ssd(args):
    from strata.kernels.ssd.function import ssd_chunked_triton
    inputs, dims = ssd_case(args)
    L = dims[-1]
    x, dt, A, B, C, D, dt_bias = inputs

    def call(fn):
        return lambda x, dt, A, B, C, D, dt_bias: fn(x, dt, A, B, C, L, D=D, dt_bias=dt_bias, dt_softplus=True)

    # bf16 correctness: Triton on bf16 inputs against the reference in fp32 on the same values.
    tri_in = [leaf(t) for t in inputs]
    ref_in = [leaf(t, torch.float32) for t in inputs]
    y = call(ssd_chunked_triton)(*tri_in)
    y_ref = call(ssd_chunked_ref)(*ref_in)
    gy = torch.randn_like(y_ref)
    gt = torch.autograd.grad(y, tri_in, gy.to(y.dtype))
    gr = torch.autograd.grad(y_ref, ref_in, gy)
    errs = {"y": rel(y, y_ref), **{f"d{nm}": rel(a, r) for nm, a, r in zip("x dt A B C D dt_bias".split(), gt, gr)}}
    print("ssd bf16 errors:", " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    del y_ref, gr, ref_in
    torch.cuda.empty_cache()

    fb, bb, ff, bf = ssd_cost(dims)
    fwd_in = [t.detach() for t in inputs]
    impls = [("reference", lambda: call(ssd_chunked_ref)(*fwd_in)),
             ("triton", lambda: call(ssd_chunked_triton)(*fwd_in))]
    if args.compile:
        cref = compiled(call(ssd_chunked_ref))
        impls.insert(1, ("compiled ref", lambda: cref(*fwd_in)))
    with torch.no_grad():
        run_variants("ssd", "fwd", impls, fb, ff, errs["y"])
    tin = [leaf(t) for t in inputs]
    impls = [("reference", fwd_bwd(call(ssd_chunked_ref), tin)), ("triton", fwd_bwd(call(ssd_chunked_triton), tin))]
    if args.compile:
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants("ssd", "fwd+bwd", impls, fb + bb, ff + bf, max(errs.values()), grad_to_none=tin)


def ssd_breakdown(args, sweep):
    """Time each SSD launch alone; with sweep, try block-size variants and keep the fastest."""
    from strata.kernels.ssd import config
    from strata.kernels.ssd.cumsum import chunk_cumsum_fwd
    from strata.kernels.ssd.scan import bmm_fwd, scan_fwd
    from strata.kernels.ssd.scan_bwd import dbc_bwd, dcb_bwd, dx_bwd
    from strata.kernels.ssd.state import state_bwd, state_fwd
    (x, dt, A, B, C, D, dt_bias), dims = ssd_case(args)
    L = dims[-1]
    dt_proc, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, True, L)
    states, _ = state_fwd(x, B, dt_proc, dA_cs, None)
    CB = bmm_fwd(C, B, L)
    dy = torch.randn_like(x)
    dS, _, _ = state_bwd(dy, C, dA_cs, states, None, False)
    dCB, _ = dcb_bwd(x, dy, CB, dt_proc, dA_cs, 1)
    launches = {
        "cumsum": (None, lambda: chunk_cumsum_fwd(dt, A, dt_bias, True, L)),
        "state_fwd": ("state_fwd", lambda: state_fwd(x, B, dt_proc, dA_cs, None)),
        "bmm": ("bmm", lambda: bmm_fwd(C, B, L)),
        "scan_fwd": ("scan_fwd", lambda: scan_fwd(x, C, CB, dt_proc, dA_cs, states, D, None, x.dtype)),
        "state_bwd": ("state_bwd", lambda: state_bwd(dy, C, dA_cs, states, None, False)),
        "dx": ("dx", lambda: dx_bwd(x, dy, D, B, CB, dt_proc, dA_cs, dS)),
        "dcb": ("dcb", lambda: dcb_bwd(x, dy, CB, dt_proc, dA_cs, 1)),
        "dbc": ("dbc", lambda: dbc_bwd(x, dy, B, C, dCB, dt_proc, dA_cs, states, dS)),
    }
    variants = {
        "state_fwd": [dict(num_stages=4), dict(BLOCK_K=128, num_stages=2)],
        "state_bwd": [dict(num_stages=4), dict(BLOCK_K=128, num_stages=2)],
        "scan_fwd": [dict(num_stages=3), dict(BLOCK_S=64), dict(num_warps=8)],
        "dx": [dict(num_stages=3), dict(BLOCK_K=64), dict(BLOCK_S=64)],
        "dcb": [dict(num_stages=3), dict(BLOCK_M=32, num_warps=2)],
        "dbc": [dict(num_stages=3), dict(BLOCK_S=16), dict(BLOCK_M=32)],
    }
    print("\nSSD launches (ms, median):")
    for name, (kernel, fn) in launches.items():
        base = bench(fn)
        line = f"  {name:10s} {base:7.3f}"
        if sweep and kernel in variants:
            best, best_cfg = base, {}
            for v in variants[kernel]:
                config.OVERRIDES[kernel] = v
                try:
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001
                    line += f" | {v}: failed ({type(e).__name__})"
                    continue
                line += f" | {v}: {ms:.3f}"
                if ms < best:
                    best, best_cfg = ms, v
            config.OVERRIDES[kernel] = best_cfg
            line += f"  -> keep {best_cfg or 'default'}"
        print(line, flush=True)


# ----------------------------------------------------------------------------- conv, norm

def bench_conv(args):
    from strata.kernels.conv.kernel import causal_conv1d_triton
    b, l, d, w = args.batch, args.seqlen, args.nheads * args.headdim + 2 * args.dstate, 4
    import strata.kernels.conv.kernel as conv_mod
    x = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)
    # bf16 weights: the reference's F.conv1d needs one dtype outside autocast.
    wt = (torch.randn(d, w, device="cuda") * 0.3).to(torch.bfloat16)
    bias = torch.randn(d, device="cuda").to(torch.bfloat16)
    err = max_error([x, wt, bias], causal_conv1d_triton, causal_conv1d_ref)
    if args.sweep:
        sweep_knob("conv bwd", conv_mod, "BWD_BLOCKS_PER_PROGRAM", [1, 2, 4, 8, 16],
                   fwd_bwd(causal_conv1d_triton, [leaf(x), leaf(wt), leaf(bias)]))
    nbytes = 2 * 2 * b * l * d
    _run_op("conv1d", [x, wt, bias], causal_conv1d_triton, causal_conv1d_ref, nbytes, nbytes * 3 // 2,
            2 * b * l * d * w, 4 * b * l * d * w, err, args)


def bench_norm(args):
    from strata.kernels.norm.kernel import rmsnorm_triton
    rows = args.batch * args.seqlen
    for name, d, gated in (("rmsnorm", args.d_model, False), ("rmsnorm gated", 2 * args.d_model, True)):
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) if gated else None
        w = torch.rand(d, device="cuda") + 0.5
        ins = [x, w, z] if gated else [x, w]

        def tri(x, w, z=None):
            return rmsnorm_triton(x, w, 1e-5, z, None)

        def ref(x, w, z=None):
            return rmsnorm_ref(x, w, 1e-5, z, None)
        err = max_error(ins, tri, ref)
        if args.sweep:
            import strata.kernels.norm.kernel as norm_mod
            step = fwd_bwd(tri, [leaf(t) for t in ins])
            sweep_knob(name + " bwd", norm_mod, "BWD_NUM_WARPS", [None, 4, 8, 16], step)
            sweep_knob(name + " bwd", norm_mod, "BWD_ELEMENTS", [1024, 2048, 4096, 8192], step)
            sweep_knob(name + " bwd", norm_mod, "BWD_PROGRAMS_PER_SM", [4, 8, 16], step)
        e = rows * d * 2
        fwd_bytes = e * (3 if gated else 2)
        bwd_bytes = e * (5 if gated else 3)
        _run_op(name, ins, tri, ref, fwd_bytes, bwd_bytes, 0, 0, err, args)


def _run_op(op, inputs, tri, ref, fwd_bytes, bwd_bytes, fwd_flops, bwd_flops, err, args):
    det = [t.detach() for t in inputs]
    impls = [("reference", lambda: ref(*det)), ("triton", lambda: tri(*det))]
    if args.compile:
        cref = compiled(ref)
        impls.insert(1, ("compiled ref", lambda: cref(*det)))
    with torch.no_grad():
        run_variants(op, "fwd", impls, fwd_bytes, fwd_flops, err)
    tin = [leaf(t) for t in inputs]
    impls = [("reference", fwd_bwd(ref, tin)), ("triton", fwd_bwd(tri, tin))]
    if args.compile:
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants(op, "fwd+bwd", impls, fwd_bytes + bwd_bytes, fwd_flops + bwd_flops, err, grad_to_none=tin)


# ----------------------------------------------------------------------------- CE, blockdiag

def bench_ce(args):
    from strata.kernels.cross_entropy.kernel import linear_cross_entropy_triton
    n, d, V = args.batch * args.seqlen, args.d_model, args.vocab
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, d, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda")
    t[::50] = -100
    tin, rin = [leaf(h), leaf(w)], [leaf(h, torch.float32), leaf(w, torch.float32)]
    loss = linear_cross_entropy_triton(tin[0], tin[1], t)
    loss_ref = linear_cross_entropy_ref(rin[0], rin[1], t)
    gt, gr = torch.autograd.grad(loss, tin), torch.autograd.grad(loss_ref, rin)
    err = max(rel(loss, loss_ref), *(rel(a, r) for a, r in zip(gt, gr)))
    del rin, gr, loss_ref
    import strata.kernels.cross_entropy.kernel as ce_mod
    chunk = {"rows": None}
    tri_step = fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, t, chunk_size=chunk["rows"]), tin)
    if args.sweep:
        results = []
        for rows in (None, 1024, 4096, 8192):
            chunk["rows"] = rows
            results.append((bench(tri_step), rows))
        chunk["rows"] = min(results, key=lambda r: r[0])[1]
        print("  sweep linear CE chunk rows: " + ", ".join(f"{r}: {ms:.3f}" for ms, r in results)
              + f" -> {chunk['rows']}")
    print(f"  grad_weight accumulation with addmm(out_dtype=fp32): {ce_mod._ADDMM_OUT_DTYPE[0]}")
    ref_step = fwd_bwd(lambda a, b: linear_cross_entropy_ref(a, b, t), tin)
    # Liger's rule (its chunk_size): the logits chunk no larger than the hidden states
    liger_rows = 1 << (math.ceil(n / math.ceil(V / d)) - 1).bit_length()
    liger_step = fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, t, chunk_size=liger_rows), tin)
    for step in (tri_step, liger_step, ref_step):
        step()  # fix the output gradients outside the memory measurement
    for p in tin:
        p.grad = None
    mem_tri, mem_liger_rows, mem_ref = peak_mib(tri_step), peak_mib(liger_step), peak_mib(ref_step)
    for p in tin:
        p.grad = None
    print(f"linear CE peak memory beyond inputs (fwd+bwd, grads included): fused {mem_tri:.0f} MiB, "
          f"fused at Liger's {liger_rows} rows a chunk {mem_liger_rows:.0f} MiB, naive {mem_ref:.0f} MiB, "
          f"ratio {mem_tri / mem_ref:.3f}")
    flops = 2 * n * V * d
    nbytes = 2 * (n * d + V * d)
    impls = [("reference", ref_step), ("triton", tri_step), (f"triton, {liger_rows}-row chunks", liger_step)]
    if args.compile:
        cref = compiled(lambda a, b: linear_cross_entropy_ref(a, b, t))
        impls.insert(1, ("compiled ref", fwd_bwd(cref, tin)))
    run_variants("linear CE", "fwd+bwd", impls, 2 * nbytes, 3 * flops, err, grad_to_none=tin)
    ROWS[-1]["note"] = f"peak mem {mem_tri:.0f} vs {mem_ref:.0f} MiB"
    memory = {"triton": mem_tri, "reference": mem_ref, f"triton, {liger_rows}-row chunks": mem_liger_rows}
    for r in ROWS:
        if r["op"] == "linear CE" and r["impl"] in memory:
            r["mem_mib"] = memory[r["impl"]]


def bench_blockdiag(args):
    from strata.kernels.blockdiag.kernel import blockdiag_matmul_triton
    n, nb = args.batch * args.seqlen, 4
    k = m = 2 * args.d_model // nb
    x = torch.randn(n, nb * k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(nb, m, k, device="cuda") / k**0.5).to(torch.bfloat16)
    if args.sweep:
        import strata.kernels.blockdiag.kernel as bd_mod
        base = dict(bd_mod.GPU_CONFIG)
        variants = [base, {**base, "num_stages": 4}, {**base, "BLOCK_K": 32, "num_stages": 4},
                    {**base, "BLOCK_N": 256}, {**base, "BLOCK_R": 64, "num_warps": 4}]
        sweep_knob("blockdiag", bd_mod, "GPU_CONFIG", variants,
                   fwd_bwd(lambda x, w: blockdiag_matmul_triton(x, w, False), [leaf(x), leaf(w)]))
        sweep_knob("blockdiag shuffle", bd_mod, "SHUFFLE_MODE", ["copy", "strided", "tiles"],
                   fwd_bwd(lambda x, w: blockdiag_matmul_triton(x, w, True), [leaf(x), leaf(w)]))
    for shuffle in (False, True):
        def tri(x, w):
            return blockdiag_matmul_triton(x, w, shuffle)

        def ref(x, w):
            return blockdiag_matmul_ref(x, w, shuffle)
        err = max_error([x, w], tri, ref)
        e = 2
        nbytes = e * (n * nb * k + nb * m * k + n * nb * m)
        flops = 2 * n * nb * m * k
        _run_op("blockdiag" + (" shuffle" if shuffle else ""), [x, w], tri, ref, nbytes, 2 * nbytes, flops,
                2 * flops, err, args)


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="ssd,conv,norm,ce,blockdiag")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--nheads", type=int, default=64)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--sweep", action="store_true", help="try SSD block-size variants and keep the fastest")
    ap.add_argument("--breakdown", action="store_true", help="time each SSD launch alone")
    ap.add_argument("--table-file", help="also write the table here after each op")
    ap.add_argument("--hbm-tbs", type=float, default=3.0)
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out mamba_ssm, fla and Liger (they run after Strata's ops)")
    ap.add_argument("--warm-peers", action="store_true",
                    help="only call each peer of --ops once (fills Triton's caches) and exit")
    ap.add_argument("--only-peers", default="", help="comma-separated peer packages to run (default: all of PEERS)")
    ap.add_argument("--json", help="also write the rows here (after each op), for bench/gpu_suite.py")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a CUDA GPU")
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    torch.manual_seed(0)
    ops = args.ops.split(",")
    ONLY_PEERS.update(p for p in args.only_peers.split(",") if p)
    if args.warm_peers:
        bench_peers(args, ops, warm=True)
        return
    if "ssd" in ops and (args.sweep or args.breakdown):
        ssd_breakdown(args, args.sweep)
    table = {"ssd": bench_ssd, "conv": bench_conv, "norm": bench_norm, "ce": bench_ce, "blockdiag": bench_blockdiag}
    for op in ops:
        t0 = time.time()
        try:
            table[op](args)
        except Exception as e:  # noqa: BLE001 (report and go on to the next op)
            import traceback
            traceback.print_exc()
            add_row(op, "-", "-", float("nan"), 0, 0, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
        print(f"[{op} done in {time.time() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()
        if args.table_file:
            with open(args.table_file, "w") as f:
                print_table(args, f)
        if args.json:
            write_json(args, args.json)
    if args.peers:
        bench_peers(args, ops)
        if args.json:
            write_json(args, args.json)
    print_table(args)


if __name__ == "__main__":
    main()
