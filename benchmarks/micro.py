"""Micro-measurements behind the README's performance levers, one process or under MPI.

    python benchmarks/micro.py cpu                 # augmentation, inference batch, memory format,
                                                   # the backbone cosine (full-width ResNet-18)
    mpiexec -n 6 python benchmarks/micro.py exchange [--values 44600]
                                                   # our checked exchange (shared memory, then
                                                   # messages only) against raw Isend/Irecv
    python benchmarks/micro.py steps --procs 6 --threads 1 [--repeats 4] [--pin] [--heap system]
                                                   # [--slice-ms 50]
                                                   # full-width training steps of several
                                                   # processes at once (ranks sharing cores)

Prints milliseconds or seconds per item; one thread per process unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch


def _per(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def cpu() -> None:
    """Single-process costs at ResNet-18 full width (CIFAR stem, 6 outputs)."""
    from colnet_mpi.algorithms.clustering import cosine_matrix
    from colnet_mpi.data.augment import CifarAugment
    from colnet_mpi.models.resnet import resnet18
    from colnet_mpi.tasks import make_optimizer

    aug, image = CifarAugment(), torch.rand(3, 32, 32)
    print(f"CIFAR augmentation: {_per(lambda: aug(image), 300) * 1e3:.2f} ms per image")
    model = resnet18(num_outputs=6, width=64, stem="cifar").eval()
    for batch in (64, 256):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            sec = _per(lambda x=x: model(x), 2)
        print(f"inference, batch {batch}: {sec / batch * 1e3:.2f} ms per image")
    model.train()
    opt = make_optimizer("sgd", model.parameters(), lr=0.01, momentum=0.9)
    y = torch.randint(0, 6, (64,))
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = model.to(memory_format=fmt)
        x = torch.randn(64, 3, 32, 32).to(memory_format=fmt)

        def step(x=x, model=model) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        print(f"training step of 64 images, {fmt}: {_per(step, 2):.2f} s")
    rows = [torch.randn(2_779_584) for _ in range(6)]
    print(
        f"centred cosine of six full-width backbones: {_per(lambda: cosine_matrix(rows), 3):.3f} s"
    )


def exchange(values: int, repeats: int) -> None:
    """Median over ``repeats`` of the slowest rank's time, after a barrier each time."""
    from mpi4py import MPI

    from colnet_mpi.comm.topology import Topology
    from colnet_mpi.comm.transport import Transport

    world = MPI.COMM_WORLD
    with Topology(world, kind="full") as topo:
        transport = Transport(topo, torch.device("cpu"))
        messages = Transport(topo, torch.device("cpu"), shared_memory="no")
        payload = torch.randn(values)
        inbox = [torch.empty(values) for _ in topo.neighbours]

        def raw() -> None:
            reqs = [
                world.Irecv([b.numpy(), MPI.FLOAT], source=s, tag=71)
                for b, s in zip(inbox, topo.neighbours, strict=True)
            ]
            reqs += [
                world.Isend([payload.numpy(), MPI.FLOAT], dest=d, tag=71) for d in topo.neighbours
            ]
            MPI.Request.Waitall(reqs)

        result = {}
        for name, fn in (
            ("colnet (checked; shared memory on one host)", lambda: transport.exchange(payload)),
            ("colnet (checked; messages only)", lambda: messages.exchange(payload)),
            ("raw Isend/Irecv", raw),
        ):
            times = []
            for _ in range(repeats):
                world.Barrier()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            result[name] = float(np.median(np.max(world.allgather(times), axis=0)))
        if world.Get_rank() == 0:
            for name, sec in result.items():
                print(
                    f"{name}: {sec * 1e3:.2f} ms ({values:,} values to each of "
                    f"{len(topo.neighbours)} neighbours, {world.Get_size()} ranks)"
                )


def _training_step_seconds(repeats: int, heap: str) -> tuple[float, float]:
    """Seconds and minor page faults per training step of 64 CIFAR-sized images, full-width
    ResNet-18 (one process); ``heap`` = "keep" applies ``run.keep_heap`` as runs do."""
    import resource

    from colnet_mpi.models.resnet import resnet18
    from colnet_mpi.node import keep_heap_between_steps
    from colnet_mpi.tasks import make_optimizer

    if heap == "keep":
        keep_heap_between_steps()

    model = resnet18(num_outputs=6, width=64, stem="cifar").train()
    opt = make_optimizer("sgd", model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 6, (64,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sec = _per(step, repeats)  # its own warm-up step is counted among the faults
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return sec, faults / (repeats + 1)


def _set_slice(ms: float) -> None:
    """Ask the kernel (Linux 6.6 or later, EEVDF) for a time slice of ``ms`` milliseconds for this
    process and its children (``sched_setattr``, x86-64 syscall 314, policy SCHED_OTHER)."""
    import ctypes
    import struct

    # struct sched_attr: size, policy, flags, nice, priority, runtime (the slice), deadline,
    # period, util_min, util_max
    attr = struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, int(ms * 1e6), 0, 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(314, 0, ctypes.create_string_buffer(attr, 56), 0) != 0:
        raise OSError(ctypes.get_errno(), "sched_setattr failed")


def steps(
    procs: int,
    threads: int,
    repeats: int,
    pin: bool = False,
    heap: str = "keep",
    slice_ms: float = 0.0,
) -> None:
    """``procs`` processes with ``threads`` threads each train at the same time; each prints its
    seconds per step, then the step rate of all of them together. ``pin``: process i runs on
    CPU i mod (CPUs available) only, as a launcher that binds ranks to cores would place it."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "_step", "--threads", str(threads), "--repeats", str(repeats)]
    cmd += ["--heap", heap]
    cpus = sorted(os.sched_getaffinity(0))

    def placement(i: int) -> Callable[[], None] | None:
        if not pin and not slice_ms:
            return None

        def place() -> None:
            if pin:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            if slice_ms:
                _set_slice(slice_ms)

        return place

    runs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=placement(i))
        for i in range(procs)
    ]
    out = [[float(v) for v in r.communicate()[0].split()] for r in runs]
    per = [sec for sec, _ in out]
    print(
        f"{procs} process(es) x {threads} thread(s){', pinned' if pin else ''}, heap {heap}"
        + (f", {slice_ms:g} ms slices" if slice_ms else "")
        + ": "
        + ", ".join(f"{s:.2f}" for s in per)
        + f" s per step each; together one step every {1 / sum(1 / s for s in per):.2f} s; "
        + f"{np.mean([f for _, f in out]):,.0f} minor page faults per step and process"
    )


def main() -> None:
    """Parse the command line and run one measurement."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("cpu", "exchange", "steps", "_step"))
    p.add_argument("--values", type=int, default=44_600)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--procs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pin", action="store_true", help="steps: process i on CPU i mod CPUs")
    p.add_argument(
        "--heap",
        choices=("keep", "system"),
        default="keep",
        help="steps: keep freed heap pages between steps (run.keep_heap = true) or glibc's default",
    )
    p.add_argument(
        "--slice-ms",
        type=float,
        default=0.0,
        help="steps: ask for this scheduler time slice per process (Linux 6.6+); 0 = the kernel's",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads if args.what == "_step" else 1)
    if args.what == "cpu":
        cpu()
    elif args.what == "exchange":
        exchange(args.values, args.repeats or 30)
    elif args.what == "steps":
        steps(args.procs, args.threads, args.repeats or 4, args.pin, args.heap, args.slice_ms)
    else:  # one worker of "steps"
        print(*_training_step_seconds(args.repeats or 4, args.heap))


if __name__ == "__main__":
    main()
