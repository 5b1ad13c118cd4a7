"""No silent drops: the OpenAI request fields a backend kind may not honour (`n`, `best_of`, `logprobs`,
`top_logprobs`, `echo`, `suffix`), refused by name (UnsupportedFeatureError -> the route's next target,
else a 400 naming the field) or translated when the translation changes nothing the client can see.

Per kind (reference/, the backends' own sources, and llama-server b1-0c1e570 as measured):
| field | llama.cpp | SGLang | Moonshot (hosted) |
|---|---|---|---|
| `n` | up to the server's slots (`-np`, `/props` `total_slots`); more: refused | forwarded | 1 only (§2.1): 1 is dropped, more refused |
| `best_of` | accepts and ignores it | accepts and ignores it | no completions endpoint |
| `logprobs`, `top_logprobs` | forwarded (`n_probs`) | forwarded | not in the hosted API: refused |
| `echo` (completions) | accepts and ignores it: refused | forwarded | no completions endpoint |
| `suffix` (completions) | accepts and ignores it: refused | ignored without a completion template: refused | no completions endpoint |
A refused field is one set to something that asks for work (`true`, a non-empty string, a number above 0);
`false`, `""`, 0 and null ask for nothing and pass.
`best_of` everywhere: equal to `n` (or 1 without `n`) means "return every choice generated", which is what
the backend does without it, so it is dropped; larger is refused, since no backend here generates extra
candidates to pick the best from.
"""
from __future__ import annotations

from backends.errors import UnsupportedFeatureError

FIELDS = frozenset({"n", "best_of", "logprobs", "top_logprobs", "echo", "suffix"})


def asks_for_any(body: dict) -> bool:
    """One C-level look before any check: most requests name none of these fields."""
    return not FIELDS.isdisjoint(body)


def check_best_of(body: dict, backend: str) -> None:
    best_of = body.get("best_of")
    if best_of is not None and best_of > (body.get("n") or 1):
        raise UnsupportedFeatureError(
            f"'best_of' {best_of} asks for server-side candidates, which backend '{backend}' cannot generate; "
            "ask for them with 'n' and pick on the client.", backend=backend, param="best_of")


def drop_best_of(body: dict) -> None:
    """Remove, from a backend body of one's own, a `best_of` that changes nothing (check_best_of refused
    the others)."""
    body.pop("best_of", None)


def check_n(body: dict, backend: str, most: int | None, why: str) -> None:
    """`why` may name `{most}`: it is formatted only for a refusal."""
    n = body.get("n")
    if n is not None and most is not None and n > most:
        raise UnsupportedFeatureError(f"'n' is {n}; backend '{backend}' serves at most n={most} "
                                      f"({why.format(most=most)}).", backend=backend, param="n")


def check_unserved(body: dict, backend: str, fields: tuple[str, ...], why: str) -> None:
    """Refuse each of `fields` that asks for something: the backend would ignore it."""
    for field in fields:
        if body.get(field):  # false, "", 0 and null ask for nothing
            raise UnsupportedFeatureError(f"'{field}' cannot be served by backend '{backend}' ({why}).",
                                          backend=backend, param=field)
