"""generation_table(): what `kimi-gateway check` says about Kimi generations: per backend the generation it
speaks, and per hosted route the id it is sent as, with any retirement (backends/hosted_models.py)."""
from __future__ import annotations

from backends.hosted_models import today


def generation_table(config) -> str:
    lines = []
    for backend in config.backends:
        if backend.kind == "sglang":
            flags = " ".join(backend.parser_args())
            lines.append(f"  {backend.name:<24} sglang, generation {backend.generation} ({flags})")
        elif backend.kind == "llamacpp":
            lines.append(f"  {backend.name:<24} llamacpp, generation {backend.generation or 'read from /props'}")
        elif backend.kind == "moonshot":
            catalog, on = backend.catalog(), today()
            for route in config.routes:
                if backend.name not in (route.targets or ()):
                    continue
                hosted = catalog.models.get(route.name, route.name)
                date = catalog.retirement(hosted)
                if date is not None and date <= on:
                    note = f"RETIRED on {date.isoformat()}: answered 404 unless another target serves it; " \
                           f"map it in backends.{backend.name}.models"
                elif date is not None:
                    note = f"retires on {date.isoformat()}"
                else:
                    note = ""
                lines.append(f"  {backend.name:<24} {route.name} -> {hosted} "
                             f"(generation {catalog.generation_of(hosted).name}) {note}".rstrip())
    return "generations:\n" + "\n".join(lines) if lines else ""
