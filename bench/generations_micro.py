"""CPU per request that the generation layer (backends/generations.py and its callers) adds to the hot path,
piece by piece, in process: the client's switch in any form, the history's reasoning field under both names,
the hosted id's resolution (retirement, mapping, generation) and switch, the self-hosted switch, and per
stream block the `reasoning` alias scan and, for tool-using requests only, the cut-tool-call guard.

    python bench/generations_micro.py [--number 20000]

Each figure is the best of 5 runs of `--number` calls (the machine is shared: the best run is the one least
disturbed), in µs per call.
"""
from __future__ import annotations

import argparse
import copy
import timeit

import orjson

import checkout
checkout.use()  # this checkout's packages, not the venv's installed ones
from backends.cut_tool_calls import CutCallGuard, fix_cut_document
from backends.generations import generation, normalise_history, reasoning_alias_block
from backends.hosted_models import HostedCatalog
from gateway.policies.thinking import pop_reasoning_switch

CALL = [{"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
PLAIN = {"model": "kimi-k2.5", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello, how are you today?"}], "max_tokens": 16}
AGENT = {**PLAIN, "thinking": {"type": "enabled"}, "messages": PLAIN["messages"] + [
    {"role": "assistant", "content": None, "tool_calls": CALL, "reasoning": "look it up"},
    {"role": "tool", "tool_call_id": CALL[0]["id"], "content": "21"}] * 3}
BLOCK = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"kimi-k2.5","choices":'
         b'[{"index":0,"delta":{"role":null,"content":" word","reasoning_content":null,"tool_calls":null},'
         b'"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}\n\n')
TOOL_BLOCK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"k","choices":[{"index":0,'
              b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": "}}]},"finish_reason":null}]}\n\n')
REPLY = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": CALL}, "finish_reason": "tool_calls"}]}


def best_us(statement, number: int) -> float:
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    number = parser.parse_args().number
    catalog = HostedCatalog("hosted", {"kimi-k2.5": "kimi-k2.6"})
    k26 = generation("k2.6")
    plain_copies = [copy.deepcopy(PLAIN) for _ in range(5 * number + 10)]
    agent_copies = [copy.deepcopy(AGENT) for _ in range(5 * number + 10)]
    plain_iter, agent_iter = iter(plain_copies), iter(agent_copies)
    guard = CutCallGuard()
    rows = [
        ("(calibration: an empty call)", lambda: None),
        ("switch, plain request (no switch sent)", lambda: pop_reasoning_switch(next(plain_iter))),
        ("switch + history, agent request (8 turns)",
         lambda: (lambda d: (pop_reasoning_switch(d), normalise_history(d["messages"])))(next(agent_iter))),
        ("history, plain request", lambda: normalise_history(PLAIN["messages"])),
        ("hosted: resolve id (cached per day) + K2.6 switch",
         lambda: (catalog.resolve("kimi-k2.5"), k26.hosted_switch(True, None))),
        ("self-hosted: K2.6 template kwargs", lambda: k26.template_kwargs(True)),
        ("per stream block: `reasoning` alias scan", lambda: reasoning_alias_block(BLOCK)),
        ("per stream block, tool requests only: cut guard (no tool delta)", lambda: guard.block(BLOCK)),
        ("per stream block, tool requests only: cut guard (tool delta)", lambda: CutCallGuard().block(TOOL_BLOCK)),
        ("whole reply, tool requests only: cut check", lambda: fix_cut_document(orjson.loads(orjson.dumps(REPLY)))),
        ("  (of which the reply's copy in this bench)", lambda: orjson.loads(orjson.dumps(REPLY))),
    ]
    width = max(len(name) for name, _ in rows)
    for name, statement in rows:
        print(f"{name:<{width}}  {best_us(statement, number):6.2f} µs")


if __name__ == "__main__":
    main()
