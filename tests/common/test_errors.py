"""The error base: one base per package under ContinuaError, builtin kinds kept, one str rule."""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import ConfigError
from common.errors import ContinuaError

# package -> (its errors module, the one base every error there derives from)
PACKAGE_BASES = {
    "sensors": ("sensors.errors", "SensorsError"),
    "demodata": ("demodata.errors", "DemoDataError"),
    "export": ("export.errors", "ExportError"),
    "training": ("training.errors", "TrainingError"),
    "runtime": ("runtime.errors", "ContinuaRuntimeError"),
}

# error -> the builtin kinds (and former bases) callers' ``except`` clauses rely on
MIXINS = {
    "common.config.ConfigError": (ValueError,),
    "sensors.errors.WireError": (ValueError,),
    "sensors.errors.DeviceNotAvailableError": (RuntimeError,),
    "sensors.errors.CurveKeyError": (ValueError,),
    "demodata.errors.DatasetNotPreparedError": (FileNotFoundError,),
    "demodata.errors.DatasetCorruptError": (FileNotFoundError, "demodata.errors.DatasetNotPreparedError"),
    "export.errors.InputSpecError": (ValueError,),
    "training.errors.BufferCorruptError": ("training.errors.ReplayBufferError",),
    "training.errors.FeatureDatasetError": (ValueError,),
    "training.errors.UnknownStrategyError": (KeyError,),
    "runtime.errors.BusyError": ("runtime.errors.CommandError",),
    "runtime.errors.ControlTimeoutError": ("runtime.errors.ControlError",),
    "runtime.errors.RemoteError": ("runtime.errors.ControlError",),
    "runtime.errors.CheckpointWriteError": ("runtime.errors.CheckpointError",),
    "runtime.errors.NoCheckpointError": ("runtime.errors.CheckpointError",),
}


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _errors_of(module_name: str) -> list[type[BaseException]]:
    module = importlib.import_module(module_name)
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if obj.__module__ == module_name and issubclass(obj, BaseException)]


@pytest.mark.parametrize("package", sorted(PACKAGE_BASES))
def test_every_error_of_a_package_derives_from_its_one_base(package: str) -> None:
    module_name, base_name = PACKAGE_BASES[package]
    errors = _errors_of(module_name)
    base = getattr(importlib.import_module(module_name), base_name)
    assert base in errors and base.__bases__ == (ContinuaError,)
    assert [e.__name__ for e in errors if not issubclass(e, base)] == []
    # exactly one base: nothing else in the module derives from ContinuaError directly
    assert [e.__name__ for e in errors if ContinuaError in e.__bases__] == [base_name]


def test_the_package_bases_are_distinct_and_all_continua_errors() -> None:
    bases = [_resolve(f"{m}.{b}") for m, b in PACKAGE_BASES.values()]
    assert len(set(bases)) == len(bases)
    for a in bases:
        assert issubclass(a, ContinuaError)
        assert [b for b in bases if b is not a and issubclass(a, b)] == []
    assert issubclass(ConfigError, ContinuaError)


@pytest.mark.parametrize("dotted", sorted(MIXINS))
def test_builtin_kinds_are_kept_so_existing_excepts_still_catch(dotted: str) -> None:
    cls = _resolve(dotted)
    for named in MIXINS[dotted]:
        kind = _resolve(named) if isinstance(named, str) else named
        assert issubclass(cls, kind), (dotted, kind)
        with pytest.raises(kind):
            raise _instance(cls)


def test_the_moved_dataset_errors_are_the_same_classes_everywhere() -> None:
    import demodata
    import demodata.errors
    import demodata.store

    for name in ("DatasetNotPreparedError", "DatasetCorruptError"):
        assert getattr(demodata, name) is getattr(demodata.store, name) is getattr(demodata.errors, name)
    import sensors.errors

    assert not hasattr(sensors.errors, "DatasetNotPreparedError")


# ---------------------------------------------------------------- the shared shape
def test_str_is_code_message_fix_leaving_out_what_is_none() -> None:
    assert str(ContinuaError("disk full")) == "disk full"
    assert str(ContinuaError("disk full", code="no_space")) == "no_space: disk full"
    assert str(ContinuaError("disk full", fix="free some space")) == "disk full; free some space"
    assert str(ContinuaError("disk full", code="no_space", fix="free some space")) == \
        "no_space: disk full; free some space"
    assert str(ContinuaError()) == "" and ContinuaError().code is None and ContinuaError().fix is None
    err = ContinuaError("m", code="c", fix="f")
    assert (err.message, err.code, err.fix, err.args) == ("m", "c", "f", ("m",))


@given(message=st.text(), code=st.none() | st.text(min_size=1), fix=st.none() | st.text(min_size=1))
def test_the_str_rule_and_pickling_hold_for_any_text(message: str, code: str | None, fix: str | None) -> None:
    err = ContinuaError(message, code=code, fix=fix)
    want = (f"{code}: " if code else "") + message + (f"; {fix}" if fix else "")
    assert str(err) == want
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ContinuaError and str(back) == want and (back.code, back.fix) == (code, fix)


def test_subclasses_map_their_arguments_onto_the_shape_and_print_as_before() -> None:
    from export.errors import InputSpecError, ManifestMismatchError, ModelFileError
    from runtime.errors import BusyError, CommandError, NoCheckpointError, RemoteError
    from sensors.errors import WireError

    wire = WireError("payload_size", "payload is 3 bytes, expected 12")
    assert str(wire) == "payload_size: payload is 3 bytes, expected 12"
    assert (wire.reason, wire.detail) == (wire.code, wire.message) == ("payload_size", "payload is 3 bytes, expected 12")
    for cls in (CommandError, RemoteError):
        err = cls("bad_args", "seconds must be > 0")
        assert str(err) == "bad_args: seconds must be > 0" and (err.code, err.message) == ("bad_args", "seconds must be > 0")
    busy = BusyError("learn-new-task is running")
    assert str(busy) == "busy: learn-new-task is running" and busy.code == "busy"
    spec = InputSpecError("image", "dtype float64", "uint8 (N, H, W, 3)")
    assert str(spec) == "image input: dtype float64; expected uint8 (N, H, W, 3)"
    assert (spec.modality, spec.problem, spec.expected) == ("image", "dtype float64", "uint8 (N, H, W, 3)")
    assert spec.fix == "expected uint8 (N, H, W, 3)"
    model = ModelFileError("m/image.onnx", "sha256 differs")
    assert str(model) == "m/image.onnx: sha256 differs" and (model.path, model.reason) == ("m/image.onnx", "sha256 differs")
    mismatch = ManifestMismatchError(["dim 64 != 32", "taps differ"])
    assert str(mismatch) == "model manifest does not match the learner's: dim 64 != 32; taps differ"
    assert mismatch.differences == ["dim 64 != 32", "taps differ"]
    none = NoCheckpointError("no checkpoint", corrupt=["a"])
    assert str(none) == "no checkpoint" and none.corrupt == ["a"]


def test_every_error_survives_pickling_with_its_attributes() -> None:
    """A process pool or a worker process gets the same error back, whatever its constructor takes."""
    classes = [ConfigError, *(e for m, _ in PACKAGE_BASES.values() for e in _errors_of(m))]
    for cls in classes:
        err = _instance(cls)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err) and vars(back) == vars(err), cls


def _instance(cls: type) -> BaseException:
    """One instance of ``cls``, whatever positional arguments its constructor wants (all strings)."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    args = [["a", "b"] if p.name == "differences" else f"<{p.name}>" for p in params]
    return cls(*args) if args else cls("<message>")
