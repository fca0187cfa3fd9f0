"""The ``openai`` agent backend against a real chat-completions server on loopback (tests/llm_server.py).

Every failure the issue lists is played by the server: a valid answer, malformed JSON, JSON that
violates the schema, a timeout, 429 and 500 answers, a refusal, and a server without json_schema
support. Sleeps between attempts go through an injected ``sleep`` so backoff is asserted, not
waited for; each test takes well under 2 s. No network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time

import pytest
from llm_server import (
    Behaviour,
    LoopbackLLM,
    answer,
    content_filtered,
    malformed,
    rate_limited,
    refusal,
    server_error,
    slow,
)

from cogportrait.agents.backends import (
    BackendUnavailable,
    ComposeRequest,
    ComposeTargets,
    EventSummary,
    PlanRequest,
    ReviewRequest,
    SemanticReview,
)
from cogportrait.agents.llm import ChatClient, OpenAISettings, extract_json, resolve_openai_settings
from cogportrait.agents.models import Plan
from cogportrait.agents.openai_backend import PROMPTS_DIR, OpenAIBackend, check_compose, check_review, load_prompt
from cogportrait.config import OpenAIConfig
from cogportrait.schema import CONTROL_CHANNELS, EVENT_TYPES

KEY = "sk-test-5ecret-DO-NOT-LOG-0123456789"
MODEL = "test-model"
INSTRUCTION = "look slightly to the left, then lower the head smoothly"


def _example(role: str) -> dict:
    """The JSON example a prompt file shows the model (so the prompts' own examples are tested)."""
    text = (PROMPTS_DIR / f"{role}.md").read_text(encoding="utf-8")
    return json.loads(re.search(r"```json\n(.*?)```", text, re.DOTALL).group(1))


PLAN = _example("planner")  # cognitive effort, 50 frames at 25 fps, 3 events
COMPOSE = _example("composer")
REVIEW = _example("critic")
PLAN_REQUEST = PlanRequest(label="cognitive effort", instructions=[INSTRUCTION], n_frames=50, seed=3,
                           known_labels=["cognitive effort", "drowsiness"])


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    """A proxy in the environment must not swallow loopback requests."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with LoopbackLLM() as s:
        yield s


class Sleeps(list):
    """Records the pauses the client asks for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_client(server: LoopbackLLM, *, retries: int = 2, timeout_s: float = 2.0, sleep=None, **kw) -> ChatClient:
    return ChatClient(server.base_url, MODEL, KEY, timeout_s=timeout_s, temperature=0.0, retries=retries,
                      backoff_s=kw.pop("backoff_s", 0.001), max_wait_s=kw.pop("max_wait_s", 0.05),
                      sleep=sleep if sleep is not None else Sleeps(), **kw)


def last_user(recorded) -> str:
    return [m for m in recorded.messages if m["role"] == "user"][-1]["content"]


def plan_for(n_frames: int) -> dict:
    """The example plan stretched to ``n_frames`` (its last event absorbs the difference)."""
    plan = json.loads(json.dumps(PLAN))
    plan["n_frames"] = n_frames
    plan["events"][-1]["end_frame"] = n_frames
    plan["events"][-1]["end_s"] = n_frames / plan["fps"]
    return plan


# -- the valid path ------------------------------------------------------------------------------
def test_valid_plan_is_accepted_and_the_request_is_well_formed(server):
    server.script(answer(PLAN))
    backend = OpenAIBackend(make_client(server))
    plan = backend.plan(PLAN_REQUEST)

    assert isinstance(plan, Plan) and plan == Plan.model_validate(PLAN)
    assert [(e.start_frame, e.end_frame) for e in plan.events] == [(0, 6), (6, 18), (18, 50)]
    assert len(server.requests) == 1
    sent = server.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == MODEL and sent.body["temperature"] == 0.0
    assert sent.response_format == {"type": "json_schema",
                                    "json_schema": {"name": "Plan", "schema": Plan.model_json_schema(), "strict": False}}
    system, user = sent.messages
    assert system["role"] == "system" and system["content"].startswith("# Role: planning agent")
    assert "psychology expert" in system["content"] and "{{" not in system["content"]
    assert "`head_nod`" in system["content"]  # the event types are filled in from schema.py
    assert user == {"role": "user", "content": PLAN_REQUEST.model_dump_json()}


def test_label_and_instructions_are_the_users_not_the_models(server):
    reworded = dict(PLAN, label="Cognitive Effort (thinking hard)", instructions=["look left then down"])
    server.script(answer(reworded))
    plan = OpenAIBackend(make_client(server)).plan(PLAN_REQUEST)
    assert plan.label == "cognitive effort" and plan.instructions == [INSTRUCTION]


def test_fenced_and_think_wrapped_json_is_extracted(server):
    server.script(answer("<think>three stages</think>Here is the plan:\n```json\n" + json.dumps(PLAN) + "\n```\nDone."))
    assert OpenAIBackend(make_client(server)).plan(PLAN_REQUEST).n_frames == 50
    assert len(server.requests) == 1
    assert extract_json('Sure! {"a": [1, 2]} hope this helps') == {"a": [1, 2]}
    with pytest.raises(json.JSONDecodeError):
        extract_json("no json at all")


# -- answers that are refused and fed back -------------------------------------------------------
def test_malformed_json_then_valid_feeds_the_parse_error_back(server):
    server.script(malformed(), answer(PLAN))
    sleeps = Sleeps()
    plan = OpenAIBackend(make_client(server, sleep=sleeps)).plan(PLAN_REQUEST)

    assert plan.n_frames == 50 and len(server.requests) == 2
    first, second = server.requests
    assert second.messages[: len(first.messages)] == first.messages  # the conversation continues
    assert second.messages[-2] == {"role": "assistant", "content": malformed().content}
    assert "not valid JSON" in last_user(second) and "line 1 column" in last_user(second)
    assert sleeps == []  # a fixable answer is re-asked at once


def test_schema_violation_is_fed_back_with_its_location(server):
    broken = json.loads(json.dumps(PLAN))
    del broken["events"][1]["stage"]
    broken["events"][0]["targets"]["AU99"] = 0.5
    server.script(answer(broken), answer(PLAN))
    OpenAIBackend(make_client(server)).plan(PLAN_REQUEST)

    feedback = last_user(server.requests[1])
    assert "validation error(s) for Plan" in feedback
    assert "events.1.stage: Field required" in feedback
    assert "unknown channel 'AU99'" in feedback


def test_semantic_violation_is_fed_back(server):
    """A plan that tiles 50 frames is valid pydantic, but the clip has 60."""
    request = PLAN_REQUEST.model_copy(update={"n_frames": 60})
    server.script(answer(PLAN), answer(plan_for(60)))
    plan = OpenAIBackend(make_client(server)).plan(request)
    assert plan.n_frames == 60 and plan.events[-1].end_frame == 60
    assert "n_frames is 50 but the clip has 60 frames" in last_user(server.requests[1])


def test_invalid_answers_until_the_last_retry_raise_with_the_reason(server):
    server.script(malformed(), malformed(), malformed(), answer(PLAN))
    with pytest.raises(BackendUnavailable, match=r"after 3 attempt\(s\); last error: invalid answer: not valid JSON"):
        OpenAIBackend(make_client(server, retries=2)).plan(PLAN_REQUEST)
    assert len(server.requests) == 3 and server.remaining == 1


# -- transport failures --------------------------------------------------------------------------
def test_timeout_then_valid(server):
    server.script(slow(json.dumps(PLAN), delay_s=1.2), answer(PLAN))
    client = make_client(server, timeout_s=0.4, backoff_s=0.01)
    t0 = time.monotonic()
    plan = OpenAIBackend(client).plan(PLAN_REQUEST)
    assert plan.n_frames == 50 and len(server.requests) == 2
    assert time.monotonic() - t0 < 1.2  # it gave up on the slow answer instead of waiting for it
    assert client._sleep == [0.01]


def test_timeouts_exhaust_into_backend_unavailable(server):
    server.script(*(slow("{}", delay_s=0.8) for _ in range(2)))
    with pytest.raises(BackendUnavailable, match=r"after 2 attempt\(s\); last error: no answer within the 0.3 s timeout"):
        make_client(server, retries=1, timeout_s=0.3).ask([{"role": "user", "content": "x"}], Plan)


def test_429_waits_retry_after_then_succeeds(server):
    server.script(rate_limited("7"), rate_limited("120"), answer(PLAN))
    sleeps = Sleeps()
    plan = OpenAIBackend(make_client(server, sleep=sleeps, max_wait_s=10.0)).plan(PLAN_REQUEST)
    assert plan.n_frames == 50 and len(server.requests) == 3
    assert sleeps == [7.0, 10.0]  # Retry-After honoured, then capped at max_wait_s


def test_429_with_retry_after_zero_retries_at_once(server):
    server.script(rate_limited("0"), answer(PLAN))
    sleeps = Sleeps()
    OpenAIBackend(make_client(server, sleep=sleeps)).plan(PLAN_REQUEST)
    assert len(server.requests) == 2 and sleeps == []


def test_500_every_time_raises_backend_unavailable_naming_the_cause(server):
    server.script(*(server_error() for _ in range(3)))
    sleeps = Sleeps()
    client = make_client(server, retries=2, sleep=sleeps, backoff_s=1.0, max_wait_s=30.0)
    with pytest.raises(BackendUnavailable) as err:
        OpenAIBackend(client).plan(PLAN_REQUEST)
    message = str(err.value)
    assert "after 3 attempt(s)" in message and "HTTP 500" in message and "the model crashed" in message
    assert f"{MODEL} at {server.base_url}" in message
    assert len(server.requests) == 3
    assert sleeps == [1.0, 2.0]  # exponential backoff between attempts, none after the last


def test_500_then_valid(server):
    server.script(server_error(503), answer(PLAN))
    assert OpenAIBackend(make_client(server)).plan(PLAN_REQUEST).n_frames == 50


def test_other_4xx_is_not_retried_and_the_echoed_key_is_redacted(server):
    server.script(Behaviour(status=401, error=f"Incorrect API key provided: {KEY}"), answer(PLAN))
    with pytest.raises(BackendUnavailable, match="HTTP 401, not retried") as err:
        OpenAIBackend(make_client(server)).plan(PLAN_REQUEST)
    assert len(server.requests) == 1
    assert KEY not in str(err.value) and "<redacted>" in str(err.value)


def test_unreachable_server_raises_backend_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", MODEL, KEY, timeout_s=0.5, retries=1, sleep=Sleeps())
    with pytest.raises(BackendUnavailable, match=r"after 2 attempt\(s\); last error: cannot reach"):
        client.ask([{"role": "user", "content": "x"}], Plan)


def test_refusal_then_valid(server):
    server.script(refusal(), answer(PLAN))
    assert OpenAIBackend(make_client(server)).plan(PLAN_REQUEST).n_frames == 50
    assert len(server.requests) == 2


def test_refusals_every_time_give_up_with_the_refusal(server):
    server.script(refusal("I cannot describe faces."), content_filtered(), refusal("I cannot describe faces."))
    with pytest.raises(BackendUnavailable, match="the model refused: I cannot describe faces"):
        OpenAIBackend(make_client(server)).plan(PLAN_REQUEST)
    assert len(server.requests) == 3


def test_content_filter_is_retried(server):
    server.script(content_filtered(), answer(PLAN))
    OpenAIBackend(make_client(server)).plan(PLAN_REQUEST)
    assert len(server.requests) == 2


def test_server_without_json_schema_falls_back_to_json_object_once():
    with LoopbackLLM(json_schema_supported=False) as server:
        server.script(answer(PLAN), answer(PLAN))
        client = make_client(server, retries=0)  # the fallback does not spend a retry
        backend = OpenAIBackend(client)
        backend.plan(PLAN_REQUEST)
        backend.plan(PLAN_REQUEST)
    formats = [r.response_format["type"] for r in server.requests]
    assert formats == ["json_schema", "json_object", "json_object"]  # remembered for the session
    assert client.response_mode == "json_object"
    system = server.requests[1].messages[0]["content"]  # JSON mode still learns the shape
    assert "validates against this JSON schema (Plan)" in system and '"n_frames"' in system


# -- the key ----------------------------------------------------------------------------------------
def test_the_key_is_never_logged_raised_or_shown(server, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3's and ours
    server.script(malformed(), server_error(), Behaviour(status=500, error=f"bad key {KEY}"))
    client = make_client(server)
    backend = OpenAIBackend(client)
    with pytest.raises(BackendUnavailable) as err:
        backend.plan(PLAN_REQUEST)
    assert len(server.requests) == 3 and all(r.headers["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "attempt 1/3 failed" in caplog.text  # the failures are logged ...
    assert KEY not in caplog.text  # ... without the key
    assert KEY not in str(err.value) and "bad key <redacted>" in str(err.value)
    settings = resolve_openai_settings(OpenAIConfig(), server.base_url, MODEL, {"OPENAI_API_KEY": KEY})
    for shown in (repr(client), str(client), repr(backend), repr(settings)):
        assert KEY not in shown
    assert "api_key='<set>'" not in repr(client) and "api_key=<set>" in repr(client)


def test_no_key_sends_no_authorization_header(server):
    server.script(answer(PLAN))
    ChatClient(server.base_url, MODEL, None, timeout_s=2.0).ask([{"role": "user", "content": "x"}], Plan)
    assert "Authorization" not in server.requests[0].headers


# -- settings -------------------------------------------------------------------------------------
def test_settings_come_from_flags_then_params_then_environment():
    env = {"OPENAI_BASE_URL": "http://env:8000/v1/", "OPENAI_MODEL": "env-model", "OPENAI_API_KEY": "sk-env",
           "OTHER_KEY": "sk-other"}
    s = resolve_openai_settings(OpenAIConfig(timeout_s=5.0, retries=4, temperature=0.7), environ=env)
    assert s == OpenAISettings("http://env:8000/v1", "env-model", "sk-env", 5.0, 4, 0.7)

    cfg = OpenAIConfig(base_url="http://params:1/v1", model="params-model", api_key_env="OTHER_KEY")
    s = resolve_openai_settings(cfg, environ=env)
    assert (s.base_url, s.model, s.api_key) == ("http://params:1/v1", "params-model", "sk-other")

    s = resolve_openai_settings(cfg, base_url="http://flag:2/v1", model="flag-model", environ=env)
    assert (s.base_url, s.model) == ("http://flag:2/v1", "flag-model")

    s = resolve_openai_settings(OpenAIConfig(), environ={"OPENAI_BASE_URL": "http://x/v1", "OPENAI_MODEL": "m"})
    assert s.api_key is None  # local servers need none


def test_missing_or_bad_settings_raise_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="no base URL.*OPENAI_BASE_URL"):
        resolve_openai_settings(OpenAIConfig(), environ={"OPENAI_MODEL": "m"})
    with pytest.raises(BackendUnavailable, match="no model name.*OPENAI_MODEL"):
        resolve_openai_settings(OpenAIConfig(), environ={"OPENAI_BASE_URL": "http://x/v1"})
    with pytest.raises(BackendUnavailable, match="is not http"):
        resolve_openai_settings(OpenAIConfig(), base_url="localhost:8000/v1", model="m", environ={})
    with pytest.raises(BackendUnavailable, match="no base URL"):
        OpenAIBackend.from_config(OpenAIConfig(), environ={})


def test_backend_from_config_talks_to_the_resolved_server(server):
    server.script(answer(PLAN))
    backend = OpenAIBackend.from_config(OpenAIConfig(timeout_s=2.0), environ={
        "OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "env-model", "OPENAI_API_KEY": KEY})
    backend.plan(PLAN_REQUEST)
    assert server.requests[0].body["model"] == "env-model"
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


# -- composer and critic --------------------------------------------------------------------------
def compose_request() -> ComposeRequest:
    return ComposeRequest(plan=Plan.model_validate(PLAN), start_head_pose=(3.0, -2.0, 0.5))


def review_request() -> ReviewRequest:
    plan = Plan.model_validate(PLAN)
    summaries = [EventSummary(event_index=k, stage=e.stage, minimum={"gaze_left": 0.0}, mean={"gaze_left": 0.1},
                              maximum={"gaze_left": 0.2}) for k, e in enumerate(plan.events)]
    return ReviewRequest(plan=plan, events=summaries)


def test_compose_accepts_valid_targets_in_event_order(server):
    shuffled = {"events": [COMPOSE["events"][2], COMPOSE["events"][0], COMPOSE["events"][1]]}
    server.script(answer(shuffled))
    targets = OpenAIBackend(make_client(server)).compose(compose_request())
    assert isinstance(targets, ComposeTargets)
    assert [e.event_index for e in targets.events] == [0, 1, 2]
    assert targets.events[2].targets["pitch"] == (-12.0, -5.0)
    sent = server.requests[0]
    assert sent.response_format["json_schema"]["name"] == "ComposeTargets"
    assert "expert in facial behavior analysis" in sent.messages[0]["content"]
    assert json.loads(sent.messages[1]["content"]) == compose_request().model_dump(mode="json")


def test_compose_feeds_back_missing_and_unknown_events_and_channels(server):
    bad = {"events": [COMPOSE["events"][0], {"event_index": 5, "targets": {"AU99": 0.2, "gaze_up": [0.5, 0.2]}},
                      dict(COMPOSE["events"][1], event_type="eyebrow_dance")]}
    server.script(answer(bad), answer(COMPOSE))
    OpenAIBackend(make_client(server)).compose(compose_request())
    feedback = last_user(server.requests[1])
    assert "event_index 5 does not exist (the plan has events 0..2)" in feedback
    assert "unknown channel 'AU99'" in feedback
    assert "gaze_up: range [0.5, 0.2] has lo > hi" in feedback
    assert "event_type 'eyebrow_dance' is unknown" in feedback
    assert "no targets for plan event(s) [2]" in feedback


def test_review_accepts_semantic_checks(server):
    server.script(answer(REVIEW))
    review = OpenAIBackend(make_client(server)).review(review_request())
    assert isinstance(review, SemanticReview)
    assert [c.verdict for c in review.checks] == ["pass", "pass", "revise"]
    assert review.checks[2].revise == "composer" and review.checks[2].channels == ["gaze_left", "AU7"]
    assert "behavioral consistency reviewer" in server.requests[0].messages[0]["content"]


def test_review_feeds_back_incoherent_checks(server):
    bad = {"checks": [
        {"name": "blink duration", "kind": "physiological", "verdict": "pass"},
        {"name": "instruction", "kind": "semantic", "verdict": "revise", "channels": ["gaze_sideways"], "event_index": 7,
         "frames": [40, 80]},
    ]}
    server.script(answer(bad), answer(REVIEW))
    OpenAIBackend(make_client(server)).review(review_request())
    feedback = last_user(server.requests[1])
    assert "kind must be 'semantic'" in feedback
    assert "unknown channel(s) ['gaze_sideways']" in feedback
    assert "event_index 7 does not exist" in feedback
    assert "frames [40, 80] is not a span inside [0, 50)" in feedback
    assert "must say where it goes" in feedback


# -- the prompt files -----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["planner", "composer", "critic"])
def test_prompts_name_every_channel_and_their_examples_are_valid(role):
    text = load_prompt(PROMPTS_DIR, role)
    missing = [c for c in CONTROL_CHANNELS if f"`{c}`" not in text]
    assert missing == []
    assert "{{" not in text
    if role != "critic":
        assert all(f"`{t}`" in text for t in EVENT_TYPES)
    plan = Plan.model_validate(PLAN)
    assert plan.events[1].source == "instruction"
    check_compose(ComposeTargets.model_validate(COMPOSE), compose_request())
    check_review(SemanticReview.model_validate(REVIEW), review_request())


def test_a_missing_prompt_file_is_a_clear_error(tmp_path, server):
    (tmp_path / "planner.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="composer agent"):
        OpenAIBackend(make_client(server), prompts_dir=tmp_path)
