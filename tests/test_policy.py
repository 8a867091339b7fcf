"""The selection policy: configure() with a dict or a YAML file, FLASHDISPATCH_CONFIG, the "*"
wildcard, malformed policies, and autotuning. `clean_state` resets the policy after each test."""

from __future__ import annotations

import pytest
import torch

import flashdispatch
from flashdispatch import attention
from flashdispatch.dispatcher import policy
from flashdispatch.dispatcher.capabilities import capabilities

from conftest import assert_close, rand, reference


def qkv(dtype=torch.float32):
    return tuple(rand(1, 2, 6, 8, dtype=dtype) for _ in range(3))


def chosen(**options):
    q, k, v = qkv()
    explanation = flashdispatch.explain(q, k, v, **options)
    return explanation.forward, explanation.backward


def test_shipped_cpu_policy():
    # default_policy.yaml: cpu ranks sdpa-math first, then "*", tiled, reference.
    assert chosen() == ("sdpa-math", "sdpa-math")
    assert chosen(softcap=2.0) == ("tiled", "tiled")  # sdpa-math has no softcap
    ranking, where = policy.active_policy().ranking(capabilities("cpu"), "forward")
    assert ranking[0] == "sdpa-math" and "cpu.forward" in where and "shipped" in where


def test_configure_dict_reranks():
    active = flashdispatch.configure({"rankings": {"cpu": {"forward": ["tiled", "*"], "backward": ["reference", "*"]}}})
    assert isinstance(active, policy.Policy)
    assert chosen() == ("tiled", "reference")
    q, k, v = qkv()
    explanation = flashdispatch.explain(q, k, v)
    assert "configure()" in explanation.decision.forward.how
    assert "policy rank 1" in explanation.decision.forward.how
    out = attention(q, k, v)
    assert_close(out, reference(q, k, v)[0], 1e-5)


def test_configure_dict_one_direction_falls_back_to_shipped_for_the_other():
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["reference", "*"]}}})
    assert chosen() == ("reference", "sdpa-math")


def test_user_default_key_applies_to_cpu():
    # The user policy is consulted before the shipped one: a user 'default' ranking applies on the
    # CPU even though the shipped file has a more specific 'cpu' key.
    flashdispatch.configure({"rankings": {"default": {"forward": ["reference", "*"]}}})
    assert chosen()[0] == "reference"


def test_configure_none_resets():
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["reference", "*"]}}})
    assert chosen()[0] == "reference"
    flashdispatch.configure(None)
    assert chosen()[0] == "sdpa-math"


def test_configure_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rankings:\n  cpu:\n    forward: [tiled, '*']\n    backward: [tiled]\n")
    active = flashdispatch.configure(path)
    assert str(path) in active.source
    assert chosen() == ("tiled", "tiled")
    flashdispatch.configure(str(path))  # a str works too
    assert chosen() == ("tiled", "tiled")


def test_configure_empty_file_keeps_shipped_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    flashdispatch.configure(path)
    assert chosen() == ("sdpa-math", "sdpa-math")


def test_config_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "env.yaml"
    path.write_text("rankings:\n  cpu:\n    forward: [reference, '*']\n")
    monkeypatch.setenv("FLASHDISPATCH_CONFIG", str(path))
    flashdispatch.configure(None)  # the active policy is cached: re-read the environment
    assert chosen()[0] == "reference"
    assert str(path) in policy.active_policy().source
    # configure() with an explicit policy takes precedence over the variable.
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["tiled", "*"]}}})
    assert chosen()[0] == "tiled"


def test_config_environment_variable_malformed(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("rankings: [\n")
    monkeypatch.setenv("FLASHDISPATCH_CONFIG", str(path))
    with pytest.raises(ValueError, match="bad.yaml"):
        policy.set_policy(None)


def test_config_environment_variable_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="missing.yaml"):
        policy.set_policy(None)


def test_wildcard_expands_to_unlisted_backends_in_registration_order():
    registered = ["reference", "tiled", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "plugin-a"]
    assert policy.order(["sdpa-math", "*", "tiled"], registered) == [
        "sdpa-math", "reference", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "plugin-a", "tiled"]
    assert policy.order(["*"], registered) == registered
    assert policy.order(["tiled", "not-installed", "reference"], registered) == ["tiled", "reference"]
    assert policy.order(["tiled", "tiled", "*", "*"], ["a", "tiled", "b"]) == ["tiled", "a", "b"]
    assert policy.order([], registered) == []


def test_wildcard_in_configure():
    # "*" first: registration order, so "reference" (registered first) wins on the CPU.
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["*", "sdpa-math"], "backward": ["*"]}}})
    assert chosen() == ("reference", "reference")
    # Without "*", only the listed backends are candidates.
    flashdispatch.configure({"rankings": {"cpu": {"forward": ["tiled"], "backward": ["tiled"]}}})
    q, k, v = qkv()
    assert "policy rank 1 of 1 " in flashdispatch.explain(q, k, v).decision.forward.how


def test_unknown_top_level_key():
    with pytest.raises(ValueError, match="rankingz") as info:
        flashdispatch.configure({"rankingz": {}})
    assert "autotune" in str(info.value) and "rankings" in str(info.value)
    assert chosen()[0] == "sdpa-math"  # the failed configure changed nothing


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("autotune: false\nrankngs: {}\n")
    with pytest.raises(ValueError) as info:
        flashdispatch.configure(path)
    assert "rankngs" in str(info.value) and "typo.yaml" in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("autotune: false\nrankings:\n  cpu:\n    forward: [tiled, reference\n    backward: [tiled]\n  sm90: {\n")
    with pytest.raises(ValueError) as info:
        flashdispatch.configure(path)
    message = str(info.value)
    assert str(path) in message
    assert "line " in message
    line = int(message.split("line ")[1].split()[0].rstrip(":,"))
    assert 4 <= line <= 6, message


def test_malformed_yaml_tab_indentation(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("rankings:\n\tcpu: {}\n")
    with pytest.raises(ValueError, match=r"tabs\.yaml, line 2"):
        flashdispatch.configure(path)


@pytest.mark.parametrize("rankings, fragment", [
    ({"cpu": {"forward": "tiled"}}, "rankings.cpu.forward must be a list"),
    ({"cpu": {"forward": ["tiled", 3]}}, "rankings.cpu.forward must be a list"),
    ({"cpu": ["tiled"]}, "rankings.cpu must map"),
    ({"cpu": {"sideways": ["tiled"]}}, "rankings.cpu must map"),
    (["tiled"], "rankings must map"),
])
def test_ranking_not_a_list(rankings, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        flashdispatch.configure({"rankings": rankings})


@pytest.mark.parametrize("config, fragment", [
    ({"autotune": "yes"}, "autotune must be true or false"),
    (42, "config must be a path"),
    (["rankings"], "config must be a path"),
])
def test_other_malformed_policies(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        flashdispatch.configure(config)


def test_policy_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- tiled\n- reference\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        flashdispatch.configure(path)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "unsafe.yaml"
    path.write_text("rankings: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="unsafe.yaml"):
        flashdispatch.configure(path)


def test_autotune_picks_by_measured_time(monkeypatch):
    import time

    registered = flashdispatch.backends()
    # Make the policy's first choice slow, so measuring must beat the ranking.
    slow = registered["sdpa-math"]
    original = slow.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(slow, "forward", slow_forward)
    flashdispatch.configure({"autotune": True})
    q, k, v = qkv()
    explanation = flashdispatch.explain(q, k, v)
    assert "measured" in explanation.decision.forward.how
    assert "measured" in str(explanation)
    assert explanation.forward != "sdpa-math"
    # Every candidate is in the table of times.
    for name in ("reference", "tiled", "sdpa-math"):
        assert name in explanation.decision.forward.how
    out = attention(q, k, v)
    assert_close(out, reference(q, k, v)[0], 1e-5)


def test_autotune_from_yaml(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text("autotune: true\n")
    flashdispatch.configure(path)
    assert policy.active_policy().autotune
    q, k, v = qkv()
    assert "measured" in flashdispatch.explain(q, k, v).decision.forward.how


def test_autotune_with_one_candidate_does_not_measure():
    flashdispatch.configure({"autotune": True, "rankings": {"cpu": {"forward": ["tiled"], "backward": ["tiled"]}}})
    q, k, v = qkv()
    assert "measured" not in flashdispatch.explain(q, k, v).decision.forward.how
