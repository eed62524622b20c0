#!/usr/bin/env python3
"""Breaks the CPU samples of a `perf record` of the fanout host into the
parts of its request path, in microseconds per request.

    perf record -F 999 -g --call-graph dwarf,16384 -p PID -o perf.data -- sleep 8
    perf script -i perf.data -F comm,tid,ip,sym,dso > perf.txt
    python3 bench/profile/breakdown.py perf.txt CPU_MS_PER_REQUEST

Each sample goes to the first *phase* any frame of its stack belongs to
(teardown, instantiation, store set-up, telemetry, the upstream client, the
server), or else to what its innermost recognised frame is (guest code, the
wasi glue, tokio). JIT frames (no symbols, or wasmtime's perf map) are the
guest. Stacks that fault inside guest code count as page faults.
"""
import sys, re, collections

# Phases: a frame anywhere in the stack decides, in this order.
PHASES = [
 ("instance teardown (pool reset)", r"deallocate_memory|deallocate_module|StoreOpaque as core::ops::drop|drop_in_place<wasmtime::runtime::store::Store|deallocate_fiber_stack"),
 ("instantiation", r"instantiate_async|InstancePre<.*>::instantiate|ProxyPre<.*>::instantiate"),
 ("store + WASI ctx", r"wasmtime::runtime::store::Store<.*>::new|WasiCtxBuilder|WasiHttpCtx::new|MemoryOutputPipe::new|new_incoming_request|new_response_outparam|set_fuel|fuel_async_yield"),
 ("telemetry (metrics, logs, spans)", r"prometheus_client|fanout_host::metrics|tracing_subscriber|tracing_core::|AttemptRecorder|CallRecord|opentelemetry|log_guest_output"),
 ("upstream client (hyper-util, guardrails)", r"hyper_util::client|fanout_host::adapters|fanout_host::guard|hyper::client|HttpConnector"),
 ("accept + hyper server", r"hyper::proto|hyper::server|hyper_util::server|serve_connection|TcpListener|fanout_host::server::serve_http|Fanout::handle"),
]
# Otherwise the innermost frame that matches one of these.
INNER = [
 ("guest execution (wasm, incl. fuel/epoch checks)", r"^\[JIT\]|out_of_gas|new_epoch|wasmtime_fiber"),
 ("wasi-http / WASI glue (host calls, streams, resources)", r"wasmtime_wasi|wasmtime::runtime::component|wasmtime::runtime::vm|wasmtime::runtime::func|HostFn|Hooks as wasmtime_wasi_http"),
 ("tokio scheduler, wakeups", r"tokio::"),
]
phases=[(n,re.compile(p)) for n,p in PHASES]; inner=[(n,re.compile(p)) for n,p in INNER]
counts=collections.Counter(); total=0
def flush(stack):
    global total
    if not stack: return
    total+=1
    if stack[0][1].endswith("kallsyms]") and any(d=="[JIT]" for _,d in stack) and any("fault" in s for s,_ in stack):
        counts["guest page faults (memory refaulted after decommit)"]+=1; return
    for n,r in phases:
        if any(r.search(s) for s,_ in stack):
            counts[n]+=1; return
    for s,dso in stack:
        key = "[JIT]" if dso=="[JIT]" else s
        for n,r in inner:
            if r.search(key):
                counts[n]+=1; return
    counts["other (kernel, libc, idle)"]+=1
stack=[]
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("\t"):
        flush(stack); stack=[]; continue
    m=re.match(r"\s*([0-9a-f]+)\s+(.*)\s+\((.*)\)$", line.rstrip())
    if not m: continue
    sym,dso=m.group(2),m.group(3)
    if "JIT" in dso or "perf-" in dso: dso="[JIT]"
    stack.append((sym,dso))
flush(stack)
cpu_ms=float(sys.argv[2]) if len(sys.argv)>2 else None
for n,c in counts.most_common():
    extra = f"  {1000*cpu_ms*c/total:6.0f} µs/req" if cpu_ms else ""
    print(f"{100*c/total:5.1f}%{extra}  {n}")
print("samples", total)
