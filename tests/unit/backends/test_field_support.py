"""No silent drops: n, best_of, logprobs and the hosted API's fixed penalties, per backend kind."""
import pytest

from backends.base import BackendRequest
from backends.errors import UnsupportedFeatureError
from backends.hosted import MoonshotDriver, to_moonshot_body
from backends.llamacpp import LlamaCppDriver, to_llamacpp_body
from backends.sglang import SglangDriver, to_sglang_body

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def request(path: str = CHAT, **body) -> BackendRequest:
    base = {"model": "m", "messages": []} if path == CHAT else {"model": "m", "prompt": "p"}
    return BackendRequest(path=path, body={**base, **body}, model="m", route="m", adapter=None, thinking=True)


def hosted() -> MoonshotDriver:
    return MoonshotDriver("hosted", [], api_key="k", models={"m": "kimi-k2.6"})


def llama(slots: int | None) -> LlamaCppDriver:
    driver = LlamaCppDriver("llama", [])
    driver.slots = slots
    return driver


def refused_param(driver, req: BackendRequest) -> str:
    with pytest.raises(UnsupportedFeatureError) as failure:
        driver.check(req)
    return failure.value.param


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
])
def test_hosted_refuses_what_it_cannot_serve_by_name(fields, param):
    assert refused_param(hosted(), request(**fields)) == param


def test_hosted_has_no_completions():
    with pytest.raises(UnsupportedFeatureError, match="chat completions only"):
        hosted().check(request(COMPLETIONS))


def test_hosted_drops_unset_and_fixed_values_silently_only_when_they_change_nothing():
    req = request(n=1, logprobs=False, top_logprobs=None, presence_penalty=0, frequency_penalty=0.0)
    hosted().check(req)
    body = to_moonshot_body(req, "kimi-k2.6")
    assert not {"n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty"} & body.keys()
    assert req.adjustments == []


def test_hosted_penalties_are_adjusted_and_said_so():
    req = request(presence_penalty=0.5, frequency_penalty=-1)
    body = to_moonshot_body(req, "kimi-k2.6")
    assert "presence_penalty" not in body and "frequency_penalty" not in body
    assert req.adjustments == ["presence_penalty=0", "frequency_penalty=0"]


@pytest.mark.parametrize("fields, param", [({"echo": True}, "echo"), ({"suffix": " end"}, "suffix")])
def test_llama_refuses_what_it_would_ignore(fields, param):
    assert refused_param(llama(4), request(COMPLETIONS, **fields)) == param
    llama(4).check(request(COMPLETIONS, echo=False, suffix=""))  # they ask for nothing


def test_sglang_refuses_suffix_and_serves_echo():
    sglang = SglangDriver("kt", [], served_model="kimi")
    assert refused_param(sglang, request(COMPLETIONS, suffix=" end")) == "suffix"
    sglang.check(request(COMPLETIONS, echo=True))


def test_llama_n_is_bounded_by_its_slots():
    assert refused_param(llama(1), request(n=2)) == "n"
    with pytest.raises(UnsupportedFeatureError, match=r"serves at most n=2 \(one choice per llama-server slot, and it has 2\)"):
        llama(2).check(request(COMPLETIONS, n=3))
    llama(2).check(request(n=2))
    llama(None).check(request(n=4))  # slots unknown yet: llama-server itself refuses past its slots


@pytest.mark.parametrize("driver", [llama(4), SglangDriver("kt", [], served_model="kimi")],
                         ids=["llama", "sglang"])
def test_best_of_larger_than_n_is_refused(driver):
    assert refused_param(driver, request(COMPLETIONS, n=2, best_of=3)) == "best_of"
    assert refused_param(driver, request(COMPLETIONS, best_of=2)) == "best_of"


def test_best_of_equal_to_n_changes_nothing_and_is_dropped():
    """Both backends accept best_of and ignore it: only a best_of that asks for nothing may go unsaid."""
    req = request(COMPLETIONS, n=2, best_of=2)
    llama(4).check(req)
    assert "best_of" not in to_llamacpp_body(req, [], None)
    assert "best_of" not in to_sglang_body(request(COMPLETIONS, best_of=1), "kimi")
    assert to_sglang_body(request(n=3, logprobs=True, top_logprobs=2), "kimi")["n"] == 3  # served as asked
