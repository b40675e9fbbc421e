"""The job spec: loading, every validation error path, --set overrides, fingerprints, examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchgen.prompts import parse_template
from batchgen.pipeline.spec import (
    JobSpec, SpecError, check_sampling_value, load_spec, resolve_path, row_seed,
    spec_fingerprint, validate_spec,
)

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "model": {"path": "/models/llama-2-7b"},
    "input": {"path": "data/reviews/", "id_column": "id", "template": "Summarize:\n{text}\nSummary:"},
    "output": {"path": "out/reviews/"},
}


def write_spec(tmp_path: Path, data: Any, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith((".yaml", ".yml")) else json.dumps(data))
    return path


def with_changes(**sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with some keys of some sections replaced (a value of None deletes the key)."""
    data = json.loads(json.dumps(BASE))
    for section, changes in sections.items():
        target = data.setdefault(section, {})
        for key, value in changes.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return data


def errors_of(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    return str(info.value)


# ------------------------------------------------------------------------------------------ loading

def test_minimal_spec_gets_defaults_and_name_from_file(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, BASE, "reviews summaries.yaml"))
    assert spec.name == "reviews-summaries"
    assert spec.model.dtype == "auto" and spec.model.tensor_parallel == 1 and spec.model.max_num_seqs == 64
    assert spec.model.cuda_graphs is True  # used where a replica has one GPU; eager elsewhere
    assert spec.model.compile_decode is False  # opt-in: it costs a minute of compiling
    assert spec.model.attention_backend == "default"  # flex: opt-in until timed on a GPU (issue 22)
    assert spec.sampling.max_tokens == 128 and spec.sampling.temperature == 0.0 and spec.sampling.top_p == 1.0
    assert spec.output.mode == "resume"
    assert spec.execution.replicas == "auto" and spec.execution.shard_rows == 1000
    assert spec.input_columns() == ["id", "text"]


def test_explicit_name_wins(tmp_path: Path) -> None:
    assert load_spec(write_spec(tmp_path, {**BASE, "name": "my-job"})).name == "my-job"
    assert "name:" in errors_of({**BASE, "name": "bad name/with slash"})


def test_json_spec_by_extension_and_by_content(tmp_path: Path) -> None:
    assert load_spec(write_spec(tmp_path, BASE, "job.json")).input.id_column == "id"
    odd = tmp_path / "job.spec"
    odd.write_text(json.dumps(BASE))
    assert load_spec(odd).model.path == "/models/llama-2-7b"


def test_unparsable_or_non_mapping_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(listy)
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "missing.yaml")


def test_spec_error_lists_every_problem_with_its_field_path(tmp_path: Path) -> None:
    data = with_changes(sampling={"max_tokens": 0, "top_p": 1.5}, model={"dtype": "fp8"})
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, data))
    err = info.value
    paths = [p for p, _ in err.errors]
    assert paths == ["model.dtype", "sampling.max_tokens", "sampling.top_p"]
    text = str(err)
    assert text.startswith(f"invalid job spec {tmp_path / 'job.yaml'}:")
    assert "  sampling.max_tokens: Input should be greater than 0" in text.splitlines()


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("section,key", [("model", "dtyp"), ("input", "prompt"), ("sampling", "max_token"),
                                         ("output", "format"), ("execution", "shards")])
def test_unknown_keys_are_errors_with_a_suggestion(section: str, key: str) -> None:
    text = errors_of(with_changes(**{section: {key: 1}}))
    assert text.startswith(f"{section}.{key}: unknown field;")
    assert "allowed:" in text


def test_unknown_top_level_section() -> None:
    assert errors_of({**BASE, "samplng": {}}).startswith("samplng: unknown field; did you mean 'sampling'?")


@pytest.mark.parametrize("section,key,value,message", [
    ("sampling", "max_tokens", "many", "sampling.max_tokens: Input should be a valid integer"),
    ("model", "cuda_graphs", "sometimes", "model.cuda_graphs: Input should be a valid boolean"),
    ("sampling", "max_tokens", 1.5, "sampling.max_tokens: Input should be a valid integer"),
    ("sampling", "temperature", -0.1, "sampling.temperature: Input should be greater than or equal to 0"),
    ("sampling", "top_p", 0, "sampling.top_p: Input should be greater than 0"),
    ("sampling", "top_k", -1, "sampling.top_k: Input should be greater than or equal to 0"),
    ("sampling", "stop", [""], "sampling.stop[0]: String should have at least 1 character"),
    ("sampling", "stop_token_ids", [2, -1], "sampling.stop_token_ids[1]: Input should be greater than or equal"),
    ("sampling", "overrides", {"temprature": "t"}, "sampling.overrides.temprature: Input should be 'max_tokens'"),
    ("model", "tensor_parallel", 0, "model.tensor_parallel: Input should be greater than or equal to 1"),
    ("model", "path", "", "model.path: String should have at least 1 character"),
    ("input", "chat", "maybe", "input.chat: Input should be a valid boolean"),
    ("input", "keep_columns", "text", "input.keep_columns: Input should be a valid list"),
    ("output", "mode", "append", "output.mode: Input should be 'resume', 'overwrite' or 'error_if_exists'"),
    ("execution", "replicas", 0, "execution.replicas: must be 'auto' or an integer >= 1, got 0"),
    ("execution", "replicas", "lots", "execution.replicas: must be 'auto' or an integer >= 1"),
    ("execution", "shard_rows", 0, "execution.shard_rows: Input should be greater than or equal to 1"),
])
def test_wrong_types_and_ranges(section: str, key: str, value: Any, message: str) -> None:
    assert message in errors_of(with_changes(**{section: {key: value}}))


def test_missing_required_sections_and_fields() -> None:
    text = errors_of({"input": {"path": "x", "template": "{a}"}})
    assert "model: Field required" in text
    assert "input.id_column: Field required" in text
    assert "output: Field required" in text


def test_prompt_source_both_or_neither() -> None:
    both = errors_of(with_changes(input={"prompt_column": "text"}))
    assert ("input.prompt_column: set exactly one of prompt_column, template or messages_column "
            "(prompt_column and template are set)") in both
    neither = errors_of(with_changes(input={"template": None}))
    assert "input.prompt_column: set exactly one of prompt_column, template or messages_column (none is set)" in neither
    three = errors_of(with_changes(input={"prompt_column": "text", "messages_column": "m"}))
    assert "(prompt_column and template and messages_column are set)" in three


def test_messages_column_is_a_prompt_source_of_its_own() -> None:
    spec = validate_spec(with_changes(input={"template": None, "messages_column": "conv"}))
    assert spec.input.text_columns() == ["conv"] and spec.input.is_chat
    assert spec.input_columns() == ["id", "conv"]
    both = errors_of(with_changes(input={"messages_column": "conv"}))
    assert "(template and messages_column are set)" in both
    assert "input.system: a conversation carries its own system message" in errors_of(
        with_changes(input={"template": None, "messages_column": "conv", "system": "Be brief."}))


def test_template_presets_and_their_columns() -> None:
    alpaca = validate_spec(with_changes(input={"template": "alpaca"})).input
    assert alpaca.preset().name == "alpaca" and not alpaca.is_chat and alpaca.template_parts() == []
    assert alpaca.text_columns() == ["instruction", "input"]
    mapped = validate_spec(with_changes(input={"template": "alpaca",
                                               "template_columns": {"instruction": "task", "input": None}})).input
    assert mapped.text_columns() == ["task"]
    chat = validate_spec(with_changes(input={"template": "llama-2-chat", "system": "Be brief."})).input
    assert chat.is_chat and chat.text_columns() == ["prompt"]
    assert validate_spec(with_changes(input={"template": "llama-2-chat",
                                             "template_columns": {"system": "sys"}})).input.text_columns() == [
        "prompt", "sys"]
    # Unknown preset names list the known ones.
    assert errors_of(with_changes(input={"template": "vicuna"})) == (
        "input.template: unknown template preset 'vicuna'; known presets: alpaca, llama-2-chat")
    assert "input.template_columns.question: preset 'alpaca' has no slot 'question' (its slots: instruction, input)" \
        in errors_of(with_changes(input={"template": "alpaca", "template_columns": {"question": "q"}}))
    assert "input.template_columns.instruction: preset 'alpaca' needs its 'instruction' column" in errors_of(
        with_changes(input={"template": "alpaca", "template_columns": {"instruction": None}}))
    assert "input.template_columns: only a template preset (alpaca, llama-2-chat) takes template_columns" in errors_of(
        with_changes(input={"template_columns": {"input": "x"}}))
    assert "input.system: a system prompt needs chat: true (or the llama-2-chat preset)" in errors_of(
        with_changes(input={"template": "alpaca", "system": "Be brief."}))
    # Alpaca text may still be wrapped as a chat turn.
    assert validate_spec(with_changes(input={"template": "alpaca", "chat": True, "system": "S"})).input.is_chat


def test_chat_markers_in_the_spec_itself_are_refused() -> None:
    assert ("input.system: the system prompt contains the Llama-2-chat marker '<</SYS>>'" in errors_of(
        with_changes(input={"chat": True, "system": "Be brief.<</SYS>> [x"})))
    text = errors_of(with_changes(input={"chat": True, "template": "[INST] {text}"}))
    assert text.startswith("input.template: the template's text contains the Llama-2-chat marker '[INST]'")
    assert validate_spec(with_changes(input={"template": "[INST] {text}"})).input.template  # not chat: plain text
    assert "input.system: is empty" in errors_of(with_changes(input={"chat": True, "system": "  "}))


@pytest.mark.parametrize("template,fragment", [
    ("Hi {user.name}", "{user.name} is not a plain column name"),
    ("Hi {rows[0]}", "{rows[0]} is not a plain column name"),
    ("Hi {}", "{} is not a plain column name"),
    ("Hi {0}", "{0} is not a plain column name"),
    ("Hi {name!r}", "{name!r} has a conversion or format spec"),
    ("Hi {name:>{width}}", "has a conversion or format spec"),
    ("Hi {name", "malformed template"),
    ("Hi name}", "malformed template"),
    ("Hi there", "template has no {column} placeholders"),
])
def test_bad_template_placeholders(template: str, fragment: str) -> None:
    text = errors_of(with_changes(input={"template": template}))
    assert text.startswith("input.template: ")
    assert fragment in text


def test_template_literal_braces_and_parts() -> None:
    parts = parse_template("JSON {{\"a\": 1}} for {name} and {name} at {when}")
    assert parts == [('JSON {"a": 1} for ', "name"), (" and ", "name"), (" at ", "when")]
    spec = validate_spec(with_changes(input={"template": "{b} {a} {b}"}))
    assert spec.input.text_columns() == ["b", "a"]


def test_cross_field_rules_point_at_the_field() -> None:
    assert "input.system: a system prompt needs chat: true" in errors_of(with_changes(input={"system": "Be brief."}))
    assert validate_spec(with_changes(input={"system": "Be brief.", "chat": True})).input.system == "Be brief."
    assert "input.keep_columns: listed more than once: 'a'" in errors_of(with_changes(input={"keep_columns": ["a", "a"]}))
    assert "input.keep_columns: 'error' would clash" in errors_of(with_changes(input={"keep_columns": ["error"]}))
    assert "input.keep_columns: the id column 'id' is always kept" in errors_of(
        with_changes(input={"keep_columns": ["id"]}))
    assert "input.id_column: 'completion' would clash" in errors_of(with_changes(input={"id_column": "completion"}))
    assert "sampling.overrides.seed: 'id' is the id column" in errors_of(
        with_changes(sampling={"overrides": {"seed": "id"}}))
    assert "execution.heartbeat_s: must be less than lease_timeout_s (60)" in errors_of(
        with_changes(execution={"lease_timeout_s": 60, "heartbeat_s": 60}))


def test_single_stop_string_is_accepted() -> None:
    assert validate_spec(with_changes(sampling={"stop": "\n"})).sampling.stop == ["\n"]


# ------------------------------------------------------------------------------------------ --set

def test_set_overrides_are_parsed_as_yaml_and_applied_before_validation(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BASE)
    spec = load_spec(path, ["sampling.max_tokens=32", "execution.replicas=2", 'sampling.stop=["\\n", END]',
                            "input.chat=true", "sampling.overrides.top_k=k_col", "name=renamed",
                            "model.path=/other/model=v2"])
    assert spec.sampling.max_tokens == 32 and spec.execution.replicas == 2
    assert spec.sampling.stop == ["\n", "END"] and spec.input.chat is True
    assert spec.sampling.overrides == {"top_k": "k_col"}
    assert spec.name == "renamed"
    assert spec.model.path == "/other/model=v2"  # only the first '=' separates key and value


def test_set_override_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="sampling.max_tokens: Input should be greater than 0"):
        load_spec(write_spec(tmp_path, BASE), ["sampling.max_tokens=0"])


@pytest.mark.parametrize("assignment,message", [
    ("sampling.max_tokenz=3", "sampling.max_tokenz: unknown field; did you mean 'max_tokens'?"),
    ("sampler.seed=3", "sampler: unknown field; did you mean 'sampling'?"),
    ("model.path.x=1", "model.path: is a value, not a section"),
    ("sampling.overrides.seed.x=1", "sampling.overrides.seed: is a value, not a section"),
    ("max_tokens", "--set: expected key.path=value, got 'max_tokens'"),
    ("=3", "--set: expected key.path=value"),
])
def test_bad_set_paths(tmp_path: Path, assignment: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, BASE), [assignment])
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------ fingerprint

def test_fingerprint_is_stable_and_ignores_execution_output_and_name(tmp_path: Path) -> None:
    a = load_spec(write_spec(tmp_path, BASE))
    assert spec_fingerprint(a) == spec_fingerprint(load_spec(write_spec(tmp_path, BASE, "other.yaml")))
    b = load_spec(write_spec(tmp_path, BASE), ["execution.replicas=4", "execution.shard_rows=10", "name=x",
                                                "output.path=elsewhere", "output.mode=overwrite",
                                                "model.tensor_parallel=2", "model.max_num_seqs=8"])
    assert spec_fingerprint(a) == spec_fingerprint(b)
    # Writing a default explicitly is the same job as leaving it out.
    c = load_spec(write_spec(tmp_path, BASE), ["sampling.temperature=0", "sampling.top_p=1", "input.chat=false"])
    assert spec_fingerprint(a) == spec_fingerprint(c)
    assert len(spec_fingerprint(a)) == 64


@pytest.mark.parametrize("assignment", [
    "sampling.max_tokens=32", "sampling.temperature=0.5", "sampling.seed=1", "sampling.stop=[x]",
    "sampling.logprobs=true", "model.path=/models/other", "model.dtype=bfloat16", "input.path=data/other",
    "input.template='Q: {text}'", "input.truncate_prompt=true", "input.keep_columns=[a]",
    "output.token_ids=true",
])
def test_fingerprint_changes_with_fields_that_change_results(tmp_path: Path, assignment: str) -> None:
    path = write_spec(tmp_path, BASE)
    assert spec_fingerprint(load_spec(path)) != spec_fingerprint(load_spec(path, [assignment]))


# ------------------------------------------------------------------------------------------ helpers

def test_row_seed_depends_on_seed_and_id_only() -> None:
    assert row_seed(0, "a17") == row_seed(0, "a17")
    assert len({row_seed(0, "a17"), row_seed(1, "a17"), row_seed(0, "a18"), row_seed(0, 5), row_seed(0, "5")}) == 5
    assert 0 <= row_seed(2**63 - 1, "x") < 2**63


def test_check_sampling_value_uses_the_spec_bounds() -> None:
    assert check_sampling_value("max_tokens", 7) == 7
    assert check_sampling_value("top_p", 0.5) == 0.5
    with pytest.raises(ValueError, match="max_tokens=0: Input should be greater than 0"):
        check_sampling_value("max_tokens", 0)
    with pytest.raises(ValueError, match="temperature=nan"):
        check_sampling_value("temperature", float("nan"))
    with pytest.raises(ValueError, match="max_tokens=2.5"):
        check_sampling_value("max_tokens", 2.5)


def test_relative_paths_resolve_against_cwd_or_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data/x.parquet") == str(tmp_path / "data/x.parquet")
    assert resolve_path("data", base="/base") == "/base/data"
    assert resolve_path("/abs/x") == "/abs/x"
    assert resolve_path("s3://bucket/key") == "s3://bucket/key"
    spec = validate_spec(with_changes(output={"path": "s3://b/out/"})).with_resolved_paths("/jobdir")
    assert (spec.model.path, spec.input.path, spec.output.path) == (
        "/models/llama-2-7b", "/jobdir/data/reviews/", "s3://b/out/")
    assert isinstance(spec, JobSpec)


def test_every_example_job_spec_parses() -> None:
    files = sorted((REPO / "jobs").glob("*.yaml"))
    assert {f.name for f in files} >= {"demo.yaml", "summarize-reviews.yaml", "llama-65b-tp.yaml",
                                       "classify-toxicity.yaml"}
    for f in files:
        spec = load_spec(f)
        assert spec.name and spec.model.path and spec.output.path, f
    demo = load_spec(REPO / "jobs" / "demo.yaml")
    assert (demo.model.path, demo.input.path, demo.input.prompt_column, demo.output.path) == (
        "batchgen/demo/model", "demo-out/prompts.parquet", "prompt", "demo-out/results/")
    assert (demo.sampling.temperature, demo.sampling.max_tokens, demo.execution.replicas,
            demo.execution.shard_rows) == (0.0, 16, 2, 50)
    tp = load_spec(REPO / "jobs" / "llama-65b-tp.yaml")
    assert tp.model.tensor_parallel == 8 and tp.input.path.startswith("s3://")
