"""The output folder's room: one set of file names, one reader (its typed accessors and the one
served-name rule), and every command reading a folder through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.data import prompts
from daemon.outputs import names
from daemon.outputs.folder import OutputFolder, OutputFolderError, registered_name
from daemon.quality.ratefile import ModelFolderError, model_from_folder
from daemon.serving.llamaserver import ServerError, serve_target

LABELS = {"Match": 1, "No match": 0}
SERVE_HINT = "name an output folder that fine-tuner built, or a .gguf file"


def _folder(path: Path, **meta) -> Path:
    """An output folder holding only the metadata ``meta`` (over a fine-tune's essentials)."""
    path.mkdir(parents=True)
    data = {"approach": "fine_tune", "model": "gemma3:270m", "mapping": {"labels": LABELS}, **meta}
    (path / names.METADATA).write_text(json.dumps(data))
    return path


SERVED = [  # (metadata over the essentials, the served name, the registered name)
    ({"registration": {"registered": True, "name": "resp-ft:latest"}}, "resp-ft:latest", "resp-ft:latest"),
    ({"registration": {"registered": False, "withdrawn": True, "name": "resp-ft:latest"},
      "fine_tune": {"model_name": "resp-ft:latest"}}, "resp-ft:latest", None),
    ({"approach": "model_set", "registration": {"registered": False, "reason": "ollama.register is off"},
      "model_set": {"model_name": "resp-set:latest"}}, "resp-set:latest", None),
    ({"registration": {"registered": "yes", "name": "resp-ft:latest"}}, "gemma3:270m", None),
]


@pytest.mark.parametrize(("meta", "served", "registered"), SERVED,
                         ids=["registered", "withdrawn", "model-set", "base"])
def test_the_served_name_is_the_registered_one_else_the_built_one_else_the_base(tmp_path, meta, served, registered):
    """One rule: the registered Ollama name, else the name the model was built under (a fine-tune's
    or a model set's), else the base model; only a registration that succeeded counts as one."""
    folder = _folder(tmp_path / "job", **meta)
    with OutputFolder(folder) as files:
        assert (files.served_name(), files.registered_name(), registered_name(files.metadata())) == (
            served, registered, registered)


def test_serve_presents_an_unregistered_model_set_under_its_own_name(tmp_path, gemma_gguf):
    """`serve` on a model set whose registration was skipped presents it under the model set's
    name, as `status` and Ollama would know it, not under its base model's."""
    folder = _folder(tmp_path / "job", **SERVED[2][0])
    spec = serve_target(folder, base_models={"gemma3:270m": str(gemma_gguf)})
    assert (spec.alias, spec.adapters) == ("resp-set:latest", ())


def test_serve_refuses_what_rating_refuses_with_the_same_words(tmp_path):
    """An adapter folder linked elsewhere and a base model that is a path: `serve` (which read the
    metadata alone before) refuses each with the message `rate` gives, naming the file and key."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / names.ADAPTER_GGUF).write_bytes(b"GGUF")
    linked = _folder(tmp_path / "linked")
    (linked / names.TRAINING_DATA).write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    (linked / names.ADAPTER_DIR).symlink_to(elsewhere)
    pathy = _folder(tmp_path / "pathy", model="../../gemma3:270m")
    expected = {
        linked: "adapter in the model folder linked is a symbolic link or a file, not a folder; links in a model "
                "folder are never followed",
        pathy: "fine_tuning_metadata.json in the model folder pathy: model: not a valid Ollama model name (a "
               "filesystem path); use [host[:port]/][namespace/]name[:tag] made of letters, digits, '_', '.' and "
               "'-', e.g. llama3.2:1b"}
    for folder, message in expected.items():
        with pytest.raises(ServerError) as served:
            serve_target(folder, base_models={})
        with pytest.raises(ModelFolderError) as rated:
            model_from_folder(folder)
        assert (served.value.message, served.value.hint, rated.value.message) == (message, SERVE_HINT, message)


def test_a_fine_tune_whose_parameters_are_not_an_object_rebuilds_its_prompt(tmp_path):
    """Without training files the prompt is rebuilt from the topics; ``parameters`` of the wrong
    shape means no topic definition, never an AttributeError."""
    folder = _folder(tmp_path / "job", target_topics="flu", parameters=["topic_definition"])
    with OutputFolder(folder) as files:
        assert files.topic_definition() is None
    assert model_from_folder(folder).system == prompts.system_prompt("flu", LABELS, None)


def test_the_accessors_check_what_they_hand_out(tmp_path):
    """Labels, topics, the adapter folder, calibration and evaluation come back typed; an
    evaluation.json with a kappa that is a text is an OutputFolderError naming the key, no value."""
    folder = _folder(tmp_path / "job", target_topics=["flu", "covid"], fine_tune={"answer_forms": "both"})
    (folder / names.CALIBRATION).write_text('{"temperature": 1.5}')
    (folder / names.EVALUATION).write_text('{"models": [{"key": "new", "kappa": "0.9"}]}')
    with OutputFolder(folder) as files:
        assert (files.approach(), files.base_model(), files.labels(), files.topics(), files.adapter_folder(),
                files.answers_directly(), files.calibration(), files.template()) == (
            "fine_tune", "gemma3:270m", LABELS, ["flu", "covid"], folder / "adapter", True, {"temperature": 1.5},
            None)
        with pytest.raises(OutputFolderError) as info:
            files.evaluation()
    assert (info.value.file, info.value.message) == (
        "evaluation.json", "evaluation.json in the model folder job cannot be used: models[0].kappa must be a "
                           "number, not a text")


def test_the_adapter_files_are_named_once():
    """The trainer that writes the adapter, the supervisor that checks it and registration that
    uploads it use the one tuple of file names."""
    from daemon.serving import register
    from daemon.training import supervisor, trainer

    assert (trainer.ADAPTER_FILES is names.ADAPTER_FILES, supervisor.ADAPTER_FILES is names.ADAPTER_FILES,
            register.ADAPTER_FILES is names.ADAPTER_FILES) == (True, True, True)


def test_the_evaluations_files_are_read_strictly_by_the_room(tmp_path):
    """``object_file`` and ``chat_records`` refuse a link, a non-object and a line that is not a chat
    record, naming the file and the line, never quoting what is in it."""
    from daemon.outputs.folder import chat_records, object_file

    (tmp_path / "real.json").write_text('{"a": 1}')
    (tmp_path / names.MODEL_SET_CONFIG).symlink_to(tmp_path / "real.json")
    (tmp_path / "list.json").write_text('["secret cough"]')
    (tmp_path / names.VALIDATION_DATA).write_text(
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}\n'
        '{"messages": "secret cough"}\n')
    assert object_file(tmp_path / "real.json") == {"a": 1}
    with pytest.raises(OutputFolderError, match=f"^{names.MODEL_SET_CONFIG} cannot be read: "):
        object_file(tmp_path / names.MODEL_SET_CONFIG)
    with pytest.raises(OutputFolderError) as info:
        object_file(tmp_path / "list.json")
    assert (info.value.message, info.value.file) == ("list.json cannot be read: it is not a JSON object", "list.json")
    with pytest.raises(OutputFolderError) as info:
        chat_records(tmp_path / names.VALIDATION_DATA)
    assert info.value.message == (f"{names.VALIDATION_DATA} line 2 is not a chat record (an object whose messages "
                                  "are a list of turns with text content)")
    assert "secret" not in str(info.value)
