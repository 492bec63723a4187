"""One error base for the library, and the command line turning every library error into one line.

Every exception class the library defines derives from ``TRPromptError`` (and keeps a builtin
base); ``trprompt`` prints any of them as one ``trprompt: error:`` line with exit status 2.
The mistakes a user can make from the command line are triggered for real here and in
``test_cli.py``; errors that only a long run can reach (a server dying, a search failing) are
raised from inside a command to check the command line's handling of each class.
"""

import importlib
import inspect
import json
import pkgutil

import pytest
from helpers import cli_error

import trprompt_dspy
from trprompt_dspy.app import cli
from trprompt_dspy.errors import TRPromptError


def _library_exceptions() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(trprompt_dspy.__path__, "trprompt_dspy."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("trprompt_dspy."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


EXCEPTIONS = _library_exceptions()


def test_the_library_defines_its_exceptions():
    names = {cls.__name__ for cls in EXCEPTIONS}
    # the classes a user meets most; if one is renamed or lost, this list says so
    assert {"DataError", "ConfigError", "UserError", "ModelNotAvailableError", "RunFolderError", "ServerError",
            "ServerDiedError", "FinetuneInputError", "RewardSearchError", "EvaluationFailed",
            "UnsafeAdapterError", "RecordError", "DeviceError"} <= names, sorted(names)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_library_exception_has_the_one_base_and_a_builtin_base(cls):
    assert issubclass(cls, TRPromptError)
    builtin = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (BaseException, Exception, object)]
    assert builtin or cls is TRPromptError, f"{cls.__name__} keeps no builtin base (ValueError, RuntimeError...)"


@pytest.mark.parametrize("cls", [c for c in EXCEPTIONS if c is not TRPromptError], ids=lambda c: c.__name__)
def test_the_command_line_prints_any_library_error_as_one_message(cls, monkeypatch, capsys, tmp_path):
    def fail(args):
        error = cls.__new__(cls)
        error.args = (f"{cls.__name__} happened",)
        raise error

    monkeypatch.setattr(cli, "_evaluate", fail)
    code = cli.main(["evaluate", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("trprompt: error: ") and f"{cls.__name__} happened" in err and "Traceback" not in err


def test_a_pickled_adapter_is_refused_in_one_line(capsys, tmp_path):
    from trprompt_dspy import TRPromptProgram

    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text("{}")
    (trained / "adapter_model.safetensors").write_bytes(b"weights")
    program = TRPromptProgram()
    program.prompter.adapter = {"name": "prompter-x", "path": str(trained), "base_model": "m"}
    folder = tmp_path / "program"
    program.save(folder)
    copy = folder / "adapters" / "prompter-x"
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")  # a pickle's suffix
    err = cli_error(capsys, ["evaluate", str(folder), "--dataset", "words", "--n", "1"])
    assert "pickled files (adapter_model.bin)" in err


def test_a_file_with_other_columns_is_refused_in_one_line(capsys, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    err = cli_error(capsys, ["compile", "--file", str(data), "--metric", "gsm8k", "--train-size", "1", "--val-size", "0"])
    # the file and line, the column it looked for and the columns there are
    assert f"{data}:1: missing field 'question' (fields present: a, q)" in err
    err = cli_error(capsys, ["compile", "--file", str(data), "--metric", "gsm8k", "--train-size", "1", "--val-size", "0",
                             "--question-field", "q", "--answer-field", "answer"])
    assert f"{data}:1: missing field 'answer'" in err
    for command in (["compile"], ["evaluate", str(tmp_path)]):
        err = cli_error(capsys, [*command, "--dataset", "gsm8k", "--question-field", "q", "--id-field", "n"])
        assert "--question-field, --id-field name columns of your own --file" in err


def test_a_file_needs_a_metric(capsys, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    err = cli_error(capsys, ["compile", "--file", str(data), "--train-size", "1", "--val-size", "0"])
    assert "--file needs --metric" in err and "gsm8k" in err
