"""The broker's state machine without sockets: events in, outbox out. Replay, bounded attempts, stream
indices, stale incarnations, waiting with no pipeline, draining."""

from __future__ import annotations

import pytest

from hexgen_zmq.serving.broker_state import BrokerState, ToClient, ToPipeline
from hexgen_zmq.operations.deployment import load_deployment
from hexgen_zmq.wire.messages import (Cancel, ErrorEvent, GenerateRequest, Heartbeat, SamplingParams, StageFailed,
                                 StageReady, StatusReply, StatusRequest, Submit, TokenEvent, TokenRecord, Tokens)
from hexgen_zmq.model.info import read_model_info
from tests.support import deployment_dict

CLIENT = b"client-1"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def broker(tiny_model):
    spec = deployment_dict(tiny_model, [[(0, 6, 1)], [(0, 3, 1), (3, 6, 1)]], max_attempts=3, request_timeout_s=30)
    deployment = load_deployment(spec)
    state = BrokerState(deployment, read_model_info(tiny_model), clock=Clock())
    for p, pipeline in enumerate(deployment.pipelines):
        for s, stage in enumerate(pipeline.stages):
            state.on_stage_message(StageReady(stage.id, 0, 100 + s, 4096, incarnation=incarnation(p, s)))
    state.outbox.clear()
    return state


def incarnation(pipeline: int, stage: int, generation: int = 1) -> int:
    return 1000 * generation + 10 * pipeline + stage


def take(broker: BrokerState) -> list:
    out, broker.outbox = broker.outbox, []
    return out


def submits(out) -> list[tuple[str, Submit]]:
    return [(o.pipeline, o.message) for o in out if isinstance(o, ToPipeline) and isinstance(o.message, Submit)]


def events(out) -> list:
    found = []
    for o in out:
        if isinstance(o, ToClient):
            found.extend(getattr(o.message, "events", [o.message]))
    return found


def tokens(broker, pipeline: str, request_id: int, *toks: int, finished: bool = False, generation: int = 1) -> list:
    p = int(pipeline[1:])
    last = len(broker.pipelines[pipeline].spec.stages) - 1
    records = [TokenRecord(request_id, t, finished and i == len(toks) - 1, "length" if finished else None)
               for i, t in enumerate(toks)]
    broker.on_stage_message(Tokens(pipeline, records, incarnation(p, last, generation)))
    return take(broker)


def test_a_failed_pipelines_request_goes_on_elsewhere_from_where_it_was(broker):
    broker.on_client_message(CLIENT, GenerateRequest(7, SamplingParams(max_new_tokens=5), prompt_ids=[3, 4]))
    [(first_pipeline, first)] = submits(take(broker))
    got = events(tokens(broker, first_pipeline, first.request_id, 11)) + \
        events(tokens(broker, first_pipeline, first.request_id, 12))
    assert [(e.tokens, e.index) for e in got] == [([11], 0), ([12], 1)]
    p = int(first_pipeline[1:])
    broker.on_stage_message(StageFailed(broker.pipelines[first_pipeline].spec.stages[0].id, "killed",
                                        incarnation=incarnation(p, 0)))
    out = take(broker)
    cancels = [o.message for o in out if isinstance(o.message, Cancel)]
    assert cancels and cancels[0].request_ids == [first.request_id]
    [(second_pipeline, second)] = submits(out)
    assert second_pipeline != first_pipeline and second.request_id != first.request_id
    assert second.prompt == [3, 4, 11, 12] and second.params.max_new_tokens == 3 and second.generated == 2
    assert not events(out), "the client sees nothing but a pause"
    assert events(tokens(broker, first_pipeline, first.request_id, 99)) == []  # the old attempt is ignored
    done = events(tokens(broker, second_pipeline, second.request_id, 13, 14, 15, finished=True))
    assert [e.index for e in done] == [2, 3, 4] and done[-1].finished
    assert broker.replayed == 1 and broker.gave_up == 0 and not broker.requests


def test_attempts_are_bounded(broker):
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    for attempt in range(3):
        [(pipeline, submit)] = submits(take(broker))
        broker.on_stage_message(StageFailed(broker.pipelines[pipeline].spec.stages[0].id, "rejected",
                                            [submit.request_id], "stage_failed",
                                            incarnation=incarnation(int(pipeline[1:]), 0)))
    [error] = events(take(broker))
    assert isinstance(error, ErrorEvent) and error.code == "stage_failed" and "after 3 attempts" in error.message
    assert broker.gave_up == 1


def test_a_requests_own_error_is_not_replayed(broker):
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    [(pipeline, submit)] = submits(take(broker))
    broker.on_stage_message(Tokens(pipeline, [TokenRecord(submit.request_id, -1, True, "nan", "sampling_failed")],
                                   incarnation(int(pipeline[1:]), len(broker.pipelines[pipeline].spec.stages) - 1)))
    out = take(broker)
    assert not submits(out) and events(out)[0].code == "sampling_failed"


def test_late_messages_of_a_dead_incarnation_are_ignored_and_a_new_one_rejoins(broker):
    stage = broker.pipelines["p1"].spec.stages[1].id
    broker.on_stage_message(StageFailed(stage, "gone", incarnation=incarnation(1, 1)))
    assert not broker.pipelines["p1"].healthy
    broker.on_stage_message(Heartbeat(stage, 4096, incarnation=incarnation(1, 1)))  # sent before it died
    assert not broker.pipelines["p1"].ready
    broker.on_stage_message(StageReady(stage, 0, 200, 4096, incarnation=incarnation(1, 1, generation=2)))
    assert broker.pipelines["p1"].ready and broker.pipelines["p1"].healthy


def test_with_no_pipeline_a_request_waits_then_fails_at_its_deadline(broker):
    for p, pipeline in enumerate(broker.pipelines.values()):
        broker.on_stage_message(StageFailed(pipeline.spec.stages[0].id, "down", incarnation=incarnation(p, 0)))
    take(broker)
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=5), prompt_ids=[3],
                                                     timeout_s=5))
    assert not take(broker) and len(broker.queue) == 1
    broker.clock.now += 6
    broker.tick()
    [error] = [e for e in events(take(broker)) if isinstance(e, ErrorEvent)]
    assert error.code == "no_pipeline"


def test_a_duplicate_request_id_is_refused(broker):
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    take(broker)
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    [error] = events(take(broker))
    assert error.code == "invalid_request"


def test_draining_moves_every_request_and_takes_no_new_ones(broker):
    for i in range(4):
        broker.on_client_message(CLIENT, GenerateRequest(i, SamplingParams(max_new_tokens=5), prompt_ids=[3, i]))
    placed = submits(take(broker))
    on_p0 = [s.request_id for p, s in placed if p == "p0"]
    assert on_p0
    broker.drain("p0", "redeploy", healthy=True)
    moved = submits(take(broker))
    assert len(moved) == len(on_p0) and all(p == "p1" for p, _ in moved)
    broker.on_client_message(CLIENT, GenerateRequest(9, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    assert [p for p, _ in submits(take(broker))] == ["p1"]


def test_a_resumed_request_goes_on_after_the_tokens_the_client_has(broker):
    broker.on_client_message(CLIENT, GenerateRequest(4, SamplingParams(max_new_tokens=6), prompt_ids=[3, 4],
                                                     resume=[8, 9]))
    [(pipeline, submit)] = submits(take(broker))
    assert submit.prompt == [3, 4, 8, 9] and submit.params.max_new_tokens == 4 and submit.generated == 2
    [event] = events(tokens(broker, pipeline, submit.request_id, 10))
    assert isinstance(event, TokenEvent) and event.index == 2


def redeployed(broker, tiny_model, pipelines, **edits):
    """The broker's deployment with `pipelines` (p0, p1, ... as in deployment_dict) in place of its own, on
    the broker's endpoints; pipelines whose stages are unchanged keep their endpoints too."""
    spec = deployment_dict(tiny_model, pipelines, max_attempts=3, request_timeout_s=30, **edits)
    spec["broker"].update(clients=broker.config.clients, results=broker.config.results)
    for pipeline in spec["pipelines"]:
        old = broker.pipelines.get(pipeline["id"])
        if old is not None and [tuple(s["layers"]) for s in pipeline["stages"]] == [s.layers for s in old.spec.stages]:
            for stage, old_stage in zip(pipeline["stages"], old.spec.stages):
                stage.update(inbound=old_stage.inbound, tp_init=old_stage.tp_init)
    return load_deployment(spec)


def ready_all(broker, pipeline_id: str, generation: int) -> None:
    state = broker.pipelines[pipeline_id]
    for s, stage in enumerate(state.spec.stages):
        broker.on_stage_message(StageReady(stage.id, 0, 300 + s, 4096, incarnation=incarnation(int(pipeline_id[1:]), s, generation),
                                           version=state.version))


def test_a_redeploy_keeps_unchanged_pipelines_and_moves_the_requests_of_a_changed_one(broker, tiny_model):
    for i in range(4):
        broker.on_client_message(CLIENT, GenerateRequest(i, SamplingParams(max_new_tokens=5), prompt_ids=[3, i]))
    placed = submits(take(broker))
    on_p1 = [s for p, s in placed if p == "p1"]
    assert on_p1 and len(on_p1) < 4
    kept = broker.pipelines["p0"]
    renamed = broker.redeploy(redeployed(broker, tiny_model, [[(0, 6, 1)], [(0, 2, 1), (2, 6, 1)]]), "v2")
    assert broker.pipelines["p0"] is kept, "an unchanged pipeline goes on untouched"
    assert set(renamed) == {"p1"} and not broker.pipelines["p1"].ready
    out = take(broker)
    moved = submits(out)
    assert len(moved) == len(on_p1) and all(p == "p0" for p, _ in moved), "moved at once, to the pipeline serving"
    assert all(s.version == kept.version for _, s in moved)
    assert {o.pipeline for o in out if isinstance(o.message, Cancel)} == {renamed["p1"]}
    assert all(r.attempts == 1 for r in broker.requests.values()), "a redeploy's move is not a failed attempt"
    # The old p1's last stage still sends tokens: they belong to a version that is gone.
    old_version = renamed["p1"].split("@")[1]
    broker.on_stage_message(Tokens("p1", [TokenRecord(on_p1[0].request_id, 5, False)], incarnation(1, 1),
                                   version=old_version))
    assert not events(take(broker)) and broker.stale_messages == 1
    # Heartbeats of the old p1 do not make the new p1 ready; its own stages at the new version do.
    broker.on_stage_message(Heartbeat(broker.pipelines["p1"].spec.stages[0].id, 4096, incarnation=incarnation(1, 0),
                                      version=old_version))
    assert not broker.pipelines["p1"].ready
    ready_all(broker, "p1", generation=2)
    assert broker.pipelines["p1"].ready
    broker.on_client_message(CLIENT, GenerateRequest(9, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    [(pipeline, submit)] = submits(take(broker))
    assert pipeline == "p1" and submit.version == broker.pipelines["p1"].version
    broker.on_client_message(CLIENT, StatusRequest(5))
    [reply] = [o.message for o in take(broker) if isinstance(o.message, StatusReply)]
    assert {p.id: p.version for p in reply.pipelines} == {"p0": kept.version, "p1": broker.pipelines["p1"].version}
    assert reply.file_version == "v2" and reply.redeploys == 1


def test_a_redeploy_in_finish_mode_lets_requests_end_where_they_are_until_the_deadline(broker, tiny_model):
    new = redeployed(broker, tiny_model, [[(0, 6, 1)]], redeploy="finish", drain_timeout_s=20)
    for i in range(4):
        broker.on_client_message(CLIENT, GenerateRequest(i, SamplingParams(max_new_tokens=5), prompt_ids=[3, i]))
    on_p1 = [s for p, s in submits(take(broker)) if p == "p1"]
    assert len(on_p1) >= 2
    broker.redeploy(new, "v2")
    assert not submits(take(broker)), "finish: nothing moves yet"
    [retiring] = broker.retiring.values()
    assert retiring.spec.id == "p1" and retiring.retiring
    # the first finishes where it is, and its tokens still stream
    last = len(retiring.spec.stages) - 1
    broker.on_stage_message(Tokens("p1", [TokenRecord(on_p1[0].request_id, 7, True, "length")],
                                   incarnation(1, last), version=retiring.version))
    [event] = events(take(broker))
    assert event.finished and event.tokens == [7]
    broker.on_client_message(CLIENT, GenerateRequest(9, SamplingParams(max_new_tokens=5), prompt_ids=[3]))
    assert [p for p, _ in submits(take(broker))] == ["p0"], "a retiring pipeline takes no new request"
    broker.clock.now += 21
    broker.tick()
    moved = submits(take(broker))
    assert {s.generated for _, s in moved} == {0} and len(moved) == len(on_p1) - 1
    assert all(p == "p0" for p, _ in moved) and not broker.retiring


def test_a_refused_file_is_reported_and_changes_nothing(broker):
    before = dict(broker.pipelines)
    broker.refuse_file("pipelines[0].stages[0].layers: [0, 3) leaves a gap")
    assert broker.pipelines == before and "layers" in broker.file_error


def test_a_text_too_long_for_any_tokenization_is_refused_before_tokenizing(broker):
    class Untouchable:
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized a prompt that cannot fit")

    broker.encoder = Untouchable()
    broker.max_token_chars = 4  # no token covers more than 4 characters
    broker.on_client_message(CLIENT, GenerateRequest(1, SamplingParams(max_new_tokens=4),
                                                     prompt="x" * (2 * 4 * broker.max_context + 8)))
    [error] = events(take(broker))
    assert error.code == "prompt_too_long" and "past the model's context" in error.message


def test_a_finished_request_makes_room_for_a_waiting_one_at_once(tiny_model):
    spec = deployment_dict(tiny_model, [[(0, 6, 1)]], request_timeout_s=30)
    spec["pipelines"][0]["stages"][0]["kv_cache_tokens"] = 64  # 4 blocks: room for one request of 40 tokens
    deployment = load_deployment(spec)
    broker = BrokerState(deployment, read_model_info(tiny_model), clock=Clock())
    broker.on_stage_message(StageReady("p0s0", 0, 1, 64, incarnation=incarnation(0, 0)))
    for i in range(2):
        broker.on_client_message(CLIENT, GenerateRequest(i, SamplingParams(max_new_tokens=36), prompt_ids=[3, 4, 5, 6]))
    [(_, first)] = submits(take(broker))
    assert len(broker.queue) == 1
    out = tokens(broker, "p0", first.request_id, 9, finished=True)
    assert len(submits(out)) == 1 and not broker.queue, "dispatched on the finish, not on the next tick"
