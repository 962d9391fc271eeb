import json

import pytest

from hexgen_zmq.planner.model import PRESETS, load_model


def test_llama_2_70b_has_68_98_billion_parameters():
    m = PRESETS["llama-2-70b"]
    assert m.total_params == 68_976_648_192
    assert round(m.total_params / 1e9, 2) == 68.98


@pytest.mark.parametrize(("name", "params"), [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320)])
def test_smaller_llamas_match_their_checkpoints(name, params):
    assert PRESETS[name].total_params == params


def test_kv_cache_per_token_uses_gqa_heads():
    m = PRESETS["llama-2-70b"]
    assert m.kv_elements_per_token_layer(1) == 2 * 8 * 128  # 8 KV heads, not 64
    assert m.kv_elements_per_token_layer(8) == 2 * 1 * 128
    assert m.kv_elements_per_token_layer(16) == 2 * 1 * 128  # KV heads replicated beyond 8 ranks
    assert PRESETS["llama-2-7b"].kv_elements_per_token_layer(2) == 2 * 16 * 128


def test_valid_tp_degrees_follow_heads():
    m = PRESETS["llama-2-70b"]
    assert [tp for tp in (1, 2, 3, 4, 8, 16, 32, 64, 128) if m.valid_tp(tp)] == [1, 2, 4, 8, 16, 32, 64]
    assert PRESETS["llama-2-13b"].valid_tp(8) and not PRESETS["llama-2-13b"].valid_tp(16)  # 40 heads


def test_config_json_and_checkpoint_dir(tmp_path):
    config = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model(str(tmp_path)).total_params == PRESETS["llama-2-70b"].total_params
    assert load_model(str(tmp_path / "config.json")).num_key_value_heads == 8
    with pytest.raises(ValueError):
        load_model(str(tmp_path / "missing"))
