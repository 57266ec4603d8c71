"""The op allow-list walk over an uploaded SavedModel (issue 13, High 1), on hand-built protos:
every meta graph node and library function, nested functions through ``func`` attrs, the
saver's checkpoint ops only in the saver, ``PrintV2`` only to the process's streams."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

from fedcompute.taskbuilder.op_allowlist import (  # noqa: E402
    ALLOWED_OPS,
    SAVER_ONLY_OPS,
    DisallowedOpError,
    check_saved_model_file,
    check_saved_model_proto,
    refused_ops,
)


def saved_model(functions: dict[str, list[tuple[str, str]]], top: list[tuple[str, str]] = (),
                saver: tuple[str, str] | None = None,
                calls: dict[str, list[tuple[str, str, str]]] | None = None) -> saved_model_pb2.SavedModel:
    """A SavedModel proto: ``functions`` name -> [(node, op)]; ``top`` top-level [(node, op)];
    ``calls`` name -> [(node, call op, callee)] as ``f`` attrs; ``saver`` (save node, restore node)."""
    model = saved_model_pb2.SavedModel()
    meta = model.meta_graphs.add()
    for name, nodes in functions.items():
        function = meta.graph_def.library.function.add()
        function.signature.name = name
        for node_name, op in nodes:
            function.node_def.add(name=node_name, op=op)
        for node_name, op, callee in (calls or {}).get(name, []):
            function.node_def.add(name=node_name, op=op).attr["f"].func.name = callee
    for node_name, op in top:
        meta.graph_def.node.add(name=node_name, op=op)
    if saver is not None:
        save_node, restore_node = saver
        meta.saver_def.save_tensor_name = f"{save_node}:0"
        meta.saver_def.restore_op_name = restore_node
        meta.graph_def.node.add(name=save_node, op="StatefulPartitionedCall").attr["f"].func.name = "traced_save"
        meta.graph_def.node.add(name=restore_node, op="StatefulPartitionedCall").attr["f"].func.name = "traced_restore"
    return model


def test_a_model_of_allowed_ops_passes() -> None:
    model = saved_model({"predict": [("x", "Placeholder"), ("mm", "MatMul"), ("out", "Softmax")]},
                        top=[("v", "VarHandleOp")])
    assert refused_ops(model) == []
    check_saved_model_proto(model)


@pytest.mark.parametrize("op", ["ReadFile", "WriteFile", "MatchingFiles", "DeleteFile", "PyFunc", "EagerPyFunc",
                                "TFRecordDatasetV2", "InitializeTableFromTextFileV2", "WholeFileReaderV2"])
def test_file_python_and_io_ops_are_refused_naming_op_and_function(op: str) -> None:
    model = saved_model({"__inference_loss_12": [("y", "Placeholder"), ("bad", op), ("l", "Mean")]})
    with pytest.raises(DisallowedOpError) as raised:
        check_saved_model_proto(model)
    assert f"op {op} (node 'bad' in function '__inference_loss_12')" in str(raised.value)
    assert [(r.op, r.function) for r in raised.value.refused] == [(op, "__inference_loss_12")]


def test_ops_in_the_top_level_graph_are_walked_too() -> None:
    model = saved_model({}, top=[("read", "ReadFile")])
    assert [(r.op, r.node, r.function) for r in refused_ops(model)] == [("ReadFile", "read", "")]


def test_a_function_only_reached_through_a_while_body_is_walked() -> None:
    model = saved_model({"outer": [], "body": [("w", "WriteFile")], "cond": [("c", "Less")]},
                        calls={"outer": [("loop", "While", "body")]})
    assert [(r.op, r.function) for r in refused_ops(model)] == [("WriteFile", "body")]


def test_checkpoint_ops_are_allowed_in_the_saver_only() -> None:
    saver_functions = {"traced_save": [("s", "SaveV2"), ("m", "MergeV2Checkpoints"), ("n", "ShardedFilename"),
                                       ("j", "StringJoin")],
                       "traced_restore": [("r", "RestoreV2")]}
    assert refused_ops(saved_model(saver_functions, saver=("save", "restore"))) == []
    # The model's own predict function calls the save function: now SaveV2 is model code.
    hijacked = saved_model({**saver_functions, "predict": []}, saver=("save", "restore"),
                           calls={"predict": [("call", "StatefulPartitionedCall", "traced_save")]})
    assert sorted(r.op for r in refused_ops(hijacked)) == ["MergeV2Checkpoints", "SaveV2", "ShardedFilename"]
    # SaveV2 directly in a model function.
    assert [r.op for r in refused_ops(saved_model({"loss": [("s", "SaveV2")]}))] == ["SaveV2"]


def test_print_is_allowed_to_stderr_but_not_to_a_file() -> None:
    model = saved_model({"f": [("p", "PrintV2")]})
    node = model.meta_graphs[0].graph_def.library.function[0].node_def[0]
    node.attr["output_stream"].s = b"stderr"
    assert refused_ops(model) == []
    node.attr["output_stream"].s = b"file:///tmp/leak.txt"
    assert [r.reason for r in refused_ops(model)] == ["prints to 'file:///tmp/leak.txt', not to stderr/stdout/log"]


def test_every_refusal_is_listed_up_to_a_cap() -> None:
    model = saved_model({f"f{i}": [("r", "ReadFile")] for i in range(12)})
    with pytest.raises(DisallowedOpError, match="and 2 more"):
        check_saved_model_proto(model)


def test_the_allow_list_names_real_ops_and_no_file_or_io_op() -> None:
    from tensorflow.python.framework import op_def_registry

    assert sorted(op for op in ALLOWED_OPS | SAVER_ONLY_OPS if op_def_registry.get(op) is None) == []
    risky = re.compile(r"File|Dataset|Reader|Py|Iterator|Summary|Queue|Send|Recv|Collective|Table|Record")
    assert sorted(op for op in ALLOWED_OPS if risky.search(op)) == []
    assert not SAVER_ONLY_OPS & ALLOWED_OPS


def test_a_saved_model_file_is_parsed_and_checked(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(saved_model({"f": [("r", "ReadFile")]}).SerializeToString())
    with pytest.raises(DisallowedOpError, match="ReadFile"):
        check_saved_model_file(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"\xff\xff not a proto")
    with pytest.raises(Exception, match="not a SavedModel protocol buffer"):
        check_saved_model_file(tmp_path)
