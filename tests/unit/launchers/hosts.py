"""HostFacts for preflight tests: a host that can run seed 000's setup, and ways to make it bad."""
from dataclasses import replace

from backends.launchers.preflight import HostFacts

TIB = 1024 ** 4
GOOD_HOST = HostFacts(
    cpu_flags=frozenset({"avx2", "avx512f", "avx512bw", "amx_tile", "amx_int8", "amx_bf16"}),
    mem_total_bytes=2 * TIB, gpu_memory_mib=(81920, 81920), free_bytes=lambda path: 10 * TIB,
    filesystem=lambda path: 1, modules=lambda python, modules: dict.fromkeys(modules, True))


def host(**changes) -> HostFacts:
    return replace(GOOD_HOST, **changes)
