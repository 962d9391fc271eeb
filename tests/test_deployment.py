"""Deployment files: the contract loads, and every kind of mistake is reported by its field path."""

from __future__ import annotations

import copy

import pytest
import yaml

from hexgen_zmq.operations.deployment import DeploymentError, dump_deployment, load_deployment
from tests.support import deployment_dict


@pytest.fixture
def good(tiny_model):
    return deployment_dict(tiny_model, [[(0, 2, 1), (2, 6, 2)], [(0, 6, 1)]])


def test_contract_example_loads(tiny_model, tmp_path, good):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(good))
    deployment = load_deployment(path)
    pipeline, index = deployment.stage("p0s1")
    assert (pipeline.id, index, pipeline.stages[1].tp, pipeline.stages[1].layers) == ("p0", 1, 2, (2, 6))
    assert load_deployment(yaml.safe_load(dump_deployment(deployment))) == deployment


def test_relative_model_path_is_taken_from_the_file(tiny_model, tmp_path, good):
    from pathlib import Path

    good["model"]["path"] = str(Path(tiny_model).relative_to(Path(tiny_model).parent.parent))
    path = Path(tiny_model).parent.parent / "rel.yaml"
    path.write_text(yaml.safe_dump(good))
    assert load_deployment(path).model.path == str(Path(tiny_model))


def mutate(data, fn):
    data = copy.deepcopy(data)
    fn(data)
    return data


def stage(data, p, s):
    return data["pipelines"][p]["stages"][s]


CASES = {
    "overlap": (lambda d: stage(d, 0, 1).update(layers=[1, 6]), "pipelines[0].stages[1].layers", "overlaps"),
    "gap": (lambda d: stage(d, 0, 1).update(layers=[3, 6]), "pipelines[0].stages[1].layers", "gap"),
    "missing end": (lambda d: stage(d, 0, 1).update(layers=[2, 5]), "pipelines[0].stages", "model has 6 layers"),
    "past the model": (lambda d: stage(d, 1, 0).update(layers=[0, 7]), "pipelines[1].stages[0].layers", "past the model"),
    "empty range": (lambda d: stage(d, 0, 0).update(layers=[0, 0]), "pipelines[0].stages[0].layers", "empty"),
    "duplicate stage id": (lambda d: stage(d, 1, 0).update(id="p0s0"), "pipelines[1].stages[0].id", "duplicate"),
    "duplicate pipeline id": (lambda d: d["pipelines"][1].update(id="p0"), "pipelines[1].id", "duplicate"),
    "duplicate endpoint": (lambda d: stage(d, 1, 0).update(inbound=stage(d, 0, 0)["inbound"]),
                           "pipelines[1].stages[0].inbound", "also pipelines[0].stages[0].inbound"),
    "broker endpoint reused": (lambda d: stage(d, 0, 0).update(tp_init=d["broker"]["clients"]),
                               "pipelines[0].stages[0].tp_init", "also broker.clients"),
    "bad endpoint": (lambda d: d["broker"].update(clients="10.0.0.1:5555"), "broker.clients", "tcp://HOST:PORT"),
    "unknown dtype": (lambda d: d["model"].update(dtype="float8"), "model.dtype", "float8"),
    "missing checkpoint": (lambda d: d["model"].update(path="/nonexistent/model"), "model.path", "config.json"),
    "layers not a pair": (lambda d: stage(d, 0, 0).update(layers=[0, 1, 2]), "pipelines[0].stages[0].layers", ""),
    "layers wrong type": (lambda d: stage(d, 0, 0).update(layers="0-2"), "pipelines[0].stages[0].layers", "array"),
    "missing field": (lambda d: stage(d, 0, 0).pop("inbound"), "pipelines[0].stages[0]", "inbound"),
    "no ranks": (lambda d: stage(d, 0, 0).update(ranks=[]), "pipelines[0].stages[0].ranks", "at least one"),
    "bad device": (lambda d: stage(d, 0, 0)["ranks"][0].update(device="tpu:0"),
                   "pipelines[0].stages[0].ranks[0].device", "tpu:0"),
    "TP across hosts": (lambda d: stage(d, 0, 1)["ranks"][1].update(host="10.0.0.9"),
                        "pipelines[0].stages[1].ranks", "one host"),
    "TP degree the heads cannot take": (lambda d: stage(d, 0, 1).update(ranks=[{"host": "127.0.0.1"}] * 3),
                                        "pipelines[0].stages[1].ranks", "8 attention heads"),
    "same GPU twice": (lambda d: [r.update(device="cuda:0") for r in (stage(d, 0, 0)["ranks"][0], stage(d, 1, 0)["ranks"][0])],
                       "pipelines[1].stages[0].ranks[0]", "cuda:0"),
    "no pipelines": (lambda d: d.update(pipelines=[]), "pipelines", "at least one"),
    "negative kv budget": (lambda d: stage(d, 0, 0).update(kv_cache_tokens=-5), "pipelines[0].stages[0].kv_cache_tokens", ""),
    "unknown host name": (lambda d: d.update(hosts=[{"name": "a", "address": "127.0.0.1"}]) or
                          stage(d, 1, 0)["ranks"][0].update(host="b"), "pipelines[1].stages[0].ranks[0].host", "unknown host 'b'"),
    "duplicate host": (lambda d: d.update(hosts=[{"name": "a", "address": "127.0.0.1"}, {"name": "a", "address": "127.0.0.2"}]),
                       "hosts[1].name", "duplicate"),
    "bad host address": (lambda d: d.update(hosts=[{"name": "a", "address": "no such/thing"}]), "hosts[0].address", ""),
    "bad public key": (lambda d: d.update(hosts=[{"name": "a", "address": "127.0.0.1", "public_key": "short"}]),
                       "hosts[0].public_key", "40 characters"),
    "unknown broker host": (lambda d: d["broker"].update(host="z"), "broker.host", "unknown host 'z'"),
    "TP across named hosts": (lambda d: d.update(hosts=[{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.1"}])
                              or [r.update(host=h) for r, h in zip(stage(d, 0, 1)["ranks"], "ab")],
                              "pipelines[0].stages[1].ranks", "one host"),
    "inbound not on its host": (lambda d: stage(d, 0, 0).update(inbound="tcp://10.9.9.9:7000"),
                                "pipelines[0].stages[0].inbound", "not on host 127.0.0.1"),
    "broker endpoint not on its host": (lambda d: d.update(hosts=[{"name": "a", "address": "10.0.0.2"}]) or
                                        d["broker"].update(host="a"), "broker.clients", "not on host a"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_files_name_the_field(good, name):
    change, path, words = CASES[name]
    with pytest.raises(DeploymentError) as err:
        load_deployment(mutate(good, change))
    assert err.value.path == path, str(err.value)
    assert words in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(DeploymentError, match="cannot read"):
        load_deployment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(DeploymentError, match="not valid YAML"):
        load_deployment(bad)


def test_unsupported_architecture_is_named(tmp_path, good):
    import json
    import shutil

    model = tmp_path / "gpt2ish"
    shutil.copytree(good["model"]["path"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeploymentError, match="GPT2LMHeadModel") as err:
        load_deployment(mutate(good, lambda d: d["model"].update(path=str(model))))
    assert err.value.path == "model.path"


def test_plan_without_checkpoint_checks_only_the_layout(good):
    data = mutate(good, lambda d: d["model"].update(path="/models/llama-2-70b"))
    assert load_deployment(data, check_checkpoint=False).pipelines[0].stages[1].tp == 2
    bad = mutate(data, lambda d: stage(d, 1, 0).update(layers=[0, 5]))
    with pytest.raises(DeploymentError, match="layers end at 5"):
        load_deployment(bad, check_checkpoint=False)


@pytest.mark.parametrize("name,layers", [("tiny-local", 8), ("smollm2-local", 30), ("tiny-tp-local", None)])
def test_committed_configs_are_valid_layouts(name, layers):
    """Two pipelines of different shapes; the local ones are the demo's embedded default, on fixed ports."""
    from pathlib import Path

    from hexgen_zmq.operations.demo import embedded_layout

    deployment = load_deployment(Path(__file__).parent.parent / "configs" / f"{name}.yaml", check_checkpoint=False)
    assert len(deployment.pipelines) == 2
    assert len({len(p.stages) for p in deployment.pipelines}) == 2
    if layers is not None:
        assert [[s.layers for s in p.stages] for p in deployment.pipelines] == embedded_layout(layers)


def test_config_missing_fields_is_named(tmp_path, good):
    import json
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(good["model"]["path"], model)
    config = json.loads((model / "config.json").read_text())
    del config["intermediate_size"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(DeploymentError, match="missing intermediate_size") as err:
        load_deployment(mutate(good, lambda d: d["model"].update(path=str(model))))
    assert err.value.path == "model.path"


def test_hosts_place_ranks_and_the_broker_by_name(good):
    data = copy.deepcopy(good)
    data["hosts"] = [{"name": "here", "address": "127.0.0.1", "region": "lab"}]
    data["broker"]["host"] = "here"
    for pipeline in data["pipelines"]:
        for s in pipeline["stages"]:
            for rank in s["ranks"]:
                rank["host"] = "here"
    deployment = load_deployment(data)
    assert deployment.broker_host() == "here" and deployment.address_of("here") == "127.0.0.1"
    assert deployment.canonical_host("127.0.0.1") == "here"
    # the version of a pipeline follows what it is made of, not how its host is spelled
    bare = load_deployment(good)
    assert [deployment.pipeline_version(p) for p in deployment.pipelines] == \
        [bare.pipeline_version(p) for p in bare.pipelines]
    changed = mutate(good, lambda d: stage(d, 1, 0).update(max_batch_tokens=512))
    versions = [load_deployment(changed).pipeline_version(p) for p in load_deployment(changed).pipelines]
    assert versions[0] == bare.pipeline_version(bare.pipelines[0]) and versions[1] != bare.pipeline_version(bare.pipelines[1])


def test_loopback_rendezvous_ports_may_repeat_on_different_hosts(good):
    data = copy.deepcopy(good)
    data["hosts"] = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "10.0.0.2"}]
    stage(data, 1, 0)["ranks"] = [{"host": "b"}]
    stage(data, 1, 0)["inbound"] = "tcp://10.0.0.2:7000"
    stage(data, 1, 0)["tp_init"] = stage(data, 0, 0)["tp_init"]
    load_deployment(data)
    stage(data, 1, 0)["ranks"] = [{"host": "a"}]
    stage(data, 1, 0)["inbound"] = "tcp://127.0.0.1:7000"
    with pytest.raises(DeploymentError, match="tp_init"):
        load_deployment(data)
